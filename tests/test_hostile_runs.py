"""Nothing a user has is lost: inputs and finished runs are never overwritten, failures leave nothing
half-made, a resume trains the run it resumes, Ctrl-C leaves a resumable, recorded run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, REPO, compose_cfg, run_cli


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory, shapes_root, one_thread) -> Path:
    """runs/ holding one finished resnet10t run (FAST; the defaults say resnet34), 16 px, 1 epoch."""
    from visionsweep.train import train

    logs = tmp_path_factory.mktemp("runs")
    train(compose_cfg(logs / "train" / "r1", [*FAST, f"data.root={shapes_root}", "data.image_size=16",
                                             "trainer.max_epochs=1", "test=false", f"paths.log_dir={logs}"]))
    return logs


def _run(log_dir: Path) -> Path:
    return log_dir / "train" / "r1"


def _export_cfg(tmp_path: Path, ckpt: Path, *extra: str):
    return compose_cfg(tmp_path / "export", [f"ckpt_path={ckpt}", "format=state_dict", *extra], "export")


def test_export_never_writes_over_its_input_or_a_file_it_did_not_write(tmp_path, log_dir):
    from visionsweep.errors import ConfigError
    from visionsweep.export import export

    ckpt = _run(log_dir) / "checkpoints" / "last.ckpt"
    before = _digest(ckpt)
    for overwrite in ("false", "true"):  # not even overwrite=true replaces the checkpoint it reads
        with pytest.raises(ConfigError, match=r"output=.*last\.ckpt is the input file"):
            export(_export_cfg(tmp_path, ckpt, f"output={ckpt}", f"overwrite={overwrite}"))
    assert _digest(ckpt) == before

    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    with pytest.raises(ConfigError, match=r"notes\.safetensors already exists .* overwrite=true"):
        export(_export_cfg(tmp_path, ckpt, f"output={notes}"))
    assert notes.read_text() == "my notes"
    sidecar_owner = tmp_path / "w.json"  # the sidecar's name is someone else's file
    sidecar_owner.write_text("{}")
    with pytest.raises(ConfigError, match=r"w\.json already exists"):
        export(_export_cfg(tmp_path, ckpt, f"output={tmp_path / 'w.safetensors'}"))
    assert sidecar_owner.read_text() == "{}" and not (tmp_path / "w.safetensors").exists()

    info = export(_export_cfg(tmp_path, ckpt, f"output={notes}", "overwrite=true"))
    assert notes.read_bytes()[:8] != b"my notes" and info["path"] == str(notes)
    again = export(_export_cfg(tmp_path, ckpt, f"output={notes}"))  # a re-run replaces its own export
    assert again["path"] == str(notes) and json.loads(notes.with_suffix(".json").read_text())["path"] == str(notes)
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_latest_trains_the_resumed_runs_model_not_the_defaults(tmp_path, log_dir, shapes_root):
    from visionsweep.train import train

    ckpt = _run(log_dir) / "checkpoints" / "last.ckpt"
    out = tmp_path / "resumed"
    # the defaults (model=resnet34, data=digits) used to rebuild a resnet34: ~80 missing keys, a traceback
    train(compose_cfg(out, ["ckpt_path=latest", f"paths.log_dir={log_dir}", "logger=csv", "test=false",
                            "trainer.enable_progress_bar=false"]))
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "ok" and record["backbone"] == "resnet10t"
    assert Path(record["resumed_from"]) == ckpt.resolve()
    saved = (out / "config.yaml").read_text()
    assert f"root: {shapes_root}" in saved and "image_size: 16" in saved


def test_train_refuses_a_run_dir_holding_a_finished_run(log_dir):
    run = _run(log_dir)
    kept = {p: _digest(p) for p in run.rglob("*") if p.is_file()}
    result = run_cli("train", f"hydra.run.dir={run}", "trainer.max_epochs=1")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"hydra.run.dir={run} already holds a run" in lines[0], result.stderr
    assert "overwrite=true" in lines[0] and "ckpt_path=" in lines[0]
    assert {p: _digest(p) for p in run.rglob("*") if p.is_file()} == kept  # .hydra/ included


@pytest.mark.scaling  # four CLI processes (~13 s)
def test_a_failed_command_leaves_no_run_dir(tmp_path):
    result = run_cli("eval", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path / 'e'}")
    assert result.returncode == 2 and "nope.ckpt" in result.stderr and not (tmp_path / "e").exists()
    # the default layout (runs/eval/<stamp>/): the task folder this failure made goes too; one with runs stays
    logs = tmp_path / "runs"
    result = run_cli("eval", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"paths.log_dir={logs}")
    assert result.returncode == 2 and list(logs.iterdir()) == [], list(logs.rglob("*"))
    (logs / "eval" / "earlier").mkdir(parents=True)
    result = run_cli("eval", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"paths.log_dir={logs}")
    assert result.returncode == 2 and [p.name for p in (logs / "eval").iterdir()] == ["earlier"]
    own = tmp_path / "my_empty_folder"  # an empty folder of the user's around hydra.run.dir stays
    own.mkdir()
    result = run_cli("eval", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={own / 'e'}")
    assert result.returncode == 2 and own.is_dir() and not (own / "e").exists()


def test_a_failed_see_leaves_no_out_dir_and_never_writes_over_a_users_files(tmp_path):
    from visionsweep.errors import VisionSweepError
    from visionsweep.see import see

    out = tmp_path / "pictures"
    with pytest.raises(VisionSweepError, match="nope.ckpt"):
        see(compose_cfg(tmp_path / "s", ["see=features", f"ckpt_path={tmp_path / 'nope.ckpt'}",
                                         f"out_dir={out}"], "see"))
    assert not out.exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "kernels.png").write_bytes(b"my picture")
    with pytest.raises(VisionSweepError, match=r"out_dir=.*mine already holds files .* overwrite=true"):
        see(compose_cfg(tmp_path / "s", ["see=kernels", f"out_dir={mine}"], "see"))
    assert (mine / "kernels.png").read_bytes() == b"my picture"


@pytest.mark.scaling  # a real run, stopped by SIGINT (Ctrl-C) or SIGTERM (a scheduler) after its first epoch (~11 s)
@pytest.mark.parametrize(("sig", "code", "how"), [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_ctrl_c_or_sigterm_records_an_interrupted_resumable_run(tmp_path, shapes_root, sig, code, how):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "visionsweep.train", *FAST, f"data.root={shapes_root}", "data.image_size=16",
           "trainer.max_epochs=200", "callbacks.model_checkpoint.last_every_s=0", f"hydra.run.dir={run}"]
    # SIGINT as a terminal delivers it: a suite started in the background (`make test &`) ignores SIGINT,
    # its children inherit that, and Python then installs no KeyboardInterrupt handler at all
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "last.ckpt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first epoch's last.ckpt: there is something to resume
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # (a no-op once it ended) a run that ignored the signal must not go on beside the suite
    assert proc.returncode == code, err[-3000:]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "interrupted" and record["epochs"] >= 1 and record["finished"]
    assert record["metrics"] and 0.0 <= record["metrics"]["val/acc"] <= 1.0
    assert Path(record["resume_checkpoint"]).is_file()
    last = err.strip().splitlines()[-1]
    assert "interrupted after" in last and f"({how})" in last and f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in last
    assert "Traceback" not in err
