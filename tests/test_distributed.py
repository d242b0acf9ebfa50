"""DDP on CPU: two gloo processes share rank 0's run dir; rank 0 alone writes run.json and checkpoints;
``data.batch_size`` is the global batch, so 2 ranks end where one process does."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg, run_cli
from visionsweep.distributed import (
    DDPStrategy,
    _wants_sync,
    check_batch_size,
    child_command,
    processes_per_node,
    rank_batch_size,
    world_size,
)
from visionsweep.errors import ConfigError


def _cores() -> int:
    """The cores this process (and the processes it starts) may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


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
    # the documented rule (parallel.job_threads, applied by the ThreadBudget Hydra callback): a single run's budget -- the cores this process
    # may use, at most OMP_NUM_THREADS when the environment sets it -- shared by the 2 ranks, at least 1 each
    budget = _cores()
    pinned = os.environ.get("OMP_NUM_THREADS", "")
    if pinned.isdigit() and int(pinned) > 0:
        budget = min(budget, int(pinned))
    assert record["status"] == "ok" and record["threads"] == max(1, budget // 2), (record["threads"], budget)
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


def test_global_batch_is_split_among_the_ranks_and_an_uneven_one_stops_in_one_line(digits_root, tmp_path):
    from torch.utils.data import DistributedSampler

    from visionsweep.data.folder import FolderDataModule
    from visionsweep.data.seeding import NoSingleBatchSampler

    assert rank_batch_size(64) == 64 and rank_batch_size(64, 2) == 32 and rank_batch_size(64, 4, 2) == 8
    with pytest.raises(ConfigError) as e:
        rank_batch_size(63, 2, 1)
    msg = str(e.value)
    assert "\n" not in msg and "data.batch_size=63" in msg and "trainer.devices=2 x trainer.num_nodes=1" in msg
    assert "62 or 64" in msg, msg
    with pytest.raises(ConfigError, match="data.batch_size=2 or 4 "):
        rank_batch_size(3, 1, 2)  # a world of 2 nodes x 1 device
    with pytest.raises(ConfigError, match="use data.batch_size=4 "):
        rank_batch_size(1, 4)  # 0 is no batch: only the multiple above

    # from the config, before any process starts (what train.py can check first)
    cfg = compose_cfg(tmp_path / "run", ["trainer=ddp", "trainer.devices=2", "data.batch_size=63"])
    assert world_size(cfg.trainer) == 2 and cfg.trainer.sync_batchnorm == "auto"
    assert OmegaConf.to_container(cfg.trainer.strategy, resolve=True)["sync_batchnorm"] == "auto"
    with pytest.raises(ConfigError, match="data.batch_size=62 or 64"):
        check_batch_size(cfg)
    assert check_batch_size(compose_cfg(tmp_path / "one", ["data.batch_size=63"])) == 63  # one process: any batch
    nodes = OmegaConf.create({"trainer": {"strategy": {"_target_": "x"}, "devices": 2, "num_nodes": 3},
                              "data": {"batch_size": 66}})
    assert world_size(nodes.trainer) == 6 and check_batch_size(nodes) == 11

    # the data module: each rank's loaders take the rank's share, and a rank takes as many steps as one process
    dm = FolderDataModule(str(digits_root), image_size=16, val_fraction=0.1, test_fraction=0.1, batch_size=64,
                          num_workers=0, verify_images=False)
    single = dm.train_dataloader()
    assert dm.rank_batch_size == 64 and single.batch_sampler.batch_size == 64
    dm.trainer = SimpleNamespace(world_size=2, num_nodes=1)  # what Lightning attaches under trainer=ddp devices=2
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert dm.batch_size == 64 and dm.rank_batch_size == 32  # batch_size stays the global batch (images/s ...)
    assert train.batch_sampler.batch_size == 32 and val.batch_size == 32
    n = len(dm.train_samples)
    for rank in (0, 1):  # how Lightning rebuilds the rank's batch sampler (a DistributedSampler inside)
        shard = NoSingleBatchSampler(DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True), 32, False)
        assert len(shard) == len(single) == len(list(shard))  # the same steps: the same one-cycle schedule
    dm.batch_size = 63
    with pytest.raises(ConfigError, match=r"data.batch_size=63 .*\(trainer.devices=2 x trainer.num_nodes=1\)"):
        dm.train_dataloader()


def test_ddp_refuses_an_uneven_batch_and_cpu_syncbatchnorm_before_the_ranks_start(digits_root, monkeypatch):
    import pytorch_lightning as pl
    from pytorch_lightning.strategies.launchers import subprocess_script

    from visionsweep.data.folder import FolderDataModule

    def no_children(self):
        raise AssertionError("a rank was started")

    monkeypatch.setattr(subprocess_script._SubprocessScriptLauncher, "_call_children_scripts", no_children)
    assert _wants_sync("auto", "cpu") is False and _wants_sync("auto", "cuda") is True
    assert _wants_sync(False, "cpu") is False and _wants_sync(None, "cpu") is None
    with pytest.raises(ConfigError, match="trainer.sync_batchnorm=sometimes"):
        DDPStrategy(sync_batchnorm="sometimes")
    model = pl.LightningModule()
    for batch, sync, match in ((63, "auto", "data.batch_size=62 or 64"), (64, True, "sync_batchnorm=true needs GPUs")):
        dm = FolderDataModule(str(digits_root), image_size=16, batch_size=batch, num_workers=0, verify_images=False)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(sync_batchnorm=sync), logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        with pytest.raises(ConfigError, match=match):
            trainer.fit(model, datamodule=dm)


def _val_acc_and_steps(run: Path) -> tuple[float, int, dict]:
    import torch

    record = json.loads((run / "run.json").read_text())
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return record["metrics"]["val/acc_best"], ckpt["global_step"], record


@pytest.mark.scaling  # one process, then two (~2 min on 2 cores, threads=1 each; 3 epochs: both > 0.95)
def test_ddp_two_cpu_ranks_reach_the_accuracy_of_one_process(digits_root, tmp_path):
    """data.batch_size is the global batch: 2 ranks x 32 take the steps (and the schedule) of 1 x 64."""
    job = ["model=resnet10t", "data.image_size=16", f"data.root={digits_root}", "data.verify_images=false",
           "logger=csv", "trainer.max_epochs=3", "trainer.enable_progress_bar=false", "test=false", "seed=1",
           f"paths.log_dir={tmp_path / 'runs'}"]
    got, seconds = {}, {}
    for name, extra in (("single", []), ("ddp2", ["trainer=ddp", "trainer.devices=2"])):
        start = time.perf_counter()
        proc = run_cli("train", *job, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path, timeout=600)
        seconds[name] = time.perf_counter() - start
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[name] = _val_acc_and_steps(tmp_path / name)
    (single, steps1, _), (ddp, steps2, record) = got["single"], got["ddp2"]
    assert steps1 == steps2 == 3 * 23  # 1439 images: 23 batches of 64, or a rank's 720 in 23 batches of 32
    assert single > 0.8 and ddp > 0.8, (single, ddp)  # well above chance (0.1)
    assert abs(single - ddp) <= 0.03, (single, ddp)
    assert "32 per process x 2 processes" in (tmp_path / "ddp2" / "train.log").read_text()
    print(f"val acc: 1 process {single:.4f} ({seconds['single']:.0f} s), 2 ranks {ddp:.4f} "
          f"({seconds['ddp2']:.0f} s), images/s {record['train_images_per_s']}")
