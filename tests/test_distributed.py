"""DDP on CPU: two gloo processes share rank 0's run dir; rank 0 alone writes run.json and checkpoints."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from visionsweep.distributed import child_command, processes_per_node


def test_extra_ranks_run_the_saved_config_in_the_same_dir(tmp_path):
    (tmp_path / "splits").mkdir()
    command, _ = child_command(tmp_path)
    assert command[1:3] == ["-m", "visionsweep.train"] and "-m" not in command[3:]  # never the sweep again
    assert f"hydra.run.dir={tmp_path.resolve()}" in command and "hydra.output_subdir=null" in command
    assert f"data.split_dir={tmp_path.resolve() / 'splits'}" in command
    assert processes_per_node(OmegaConf.create({"devices": 1})) == 1
    assert processes_per_node(OmegaConf.create({"strategy": {"_target_": "x"}, "devices": 4})) == 4


@pytest.mark.scaling  # two processes of ~10 s of imports each, then eval
def test_ddp_two_cpu_processes_one_run_dir_and_a_checkpoint_eval_reads(digits_root, tmp_path):
    run = tmp_path / "runs" / "ddp"
    start = time.perf_counter()
    proc = run_cli("train", "trainer=ddp", "trainer.devices=2", "model=resnet10t", "data.image_size=16",
                   f"data.root={digits_root}", "data.verify_images=false", "logger=csv", "trainer.max_epochs=2",
                   "trainer.limit_train_batches=6", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}",
                   f"paths.log_dir={tmp_path / 'runs'}", cwd=tmp_path, timeout=600)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]  # no per-rank dirs
    assert (run / "train_rank1.log").is_file() and not (tmp_path / "outputs").exists()
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "ok" and record["threads"] == 1  # 2 cores / 2 ranks
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 2 and "last.ckpt" in ckpts  # written once (rank 0), no per-rank copies
    # validation is synced over both ranks' shards: it equals one process evaluating the whole val split
    # (the distributed sampler pads 179 images to 180 with one repeat)
    best = record["best_checkpoint"]
    for split, key in (("val", "val/acc_best"), ("test", "test/acc")):  # best checkpoint = best val/acc
        ev = run_cli("eval", f"ckpt_path={best}", f"split={split}", f"hydra.run.dir={tmp_path / 'eval' / split}",
                     cwd=tmp_path)
        assert ev.returncode == 0, ev.stderr[-2000:]
        got = json.loads((tmp_path / "eval" / split / "run.json").read_text())["metrics"][f"{split}/acc"]
        assert got == pytest.approx(record["metrics"][key], abs=1.5 / 179), (split, got, record["metrics"])
    print(f"DDP 2 processes: {seconds:.1f} s")
