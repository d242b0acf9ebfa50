"""What a user sees on the command line: one clear line and exit code 2 for every mistake."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from conftest import FAST, compose_cfg, run_cli
from visionsweep.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def bad_sets(tmp_path_factory, shapes_root) -> Path:
    """Folder sets with one thing wrong each, built from good shapes images."""
    root = tmp_path_factory.mktemp("bad")
    good = sorted((shapes_root / "circle").glob("*.png"))[:4]
    other = sorted((shapes_root / "square").glob("*.png"))[:4]

    def make(name: str, classes: dict[str, list[Path]]) -> Path:
        for cls, files in classes.items():
            (root / name / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, root / name / cls / f.name)
        return root / name

    (root / "empty").mkdir()
    make("one_class", {"circle": good})
    make("no_images", {"circle": good, "square": []})
    (root / "no_images" / "square" / "notes.txt").write_text("not an image")
    make("zero_byte", {"circle": good, "square": other})
    (root / "zero_byte" / "square" / "empty.png").write_bytes(b"")
    make("corrupt", {"circle": good, "square": other})
    (root / "corrupt" / "circle" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root


def _train(tmp_path: Path, *overrides: str):
    from visionsweep.train import train

    return train(compose_cfg(tmp_path / "run", [*FAST, "data=folder", *overrides]))


@pytest.mark.parametrize(("case", "error", "words"), [
    ("missing", DataError, ["missing", "does not exist"]),
    ("empty", DataError, ["empty", "no class sub-folders"]),
    ("one_class", DataError, ["one_class", "only one class"]),
    ("no_images", DataError, ["square", "no images"]),
    ("zero_byte", DataError, ["empty.png", "zero-byte", "data.skip_bad_images"]),
    ("corrupt", DataError, ["broken.jpg", "data.skip_bad_images"]),
])
def test_bad_data_gives_a_message_naming_it(bad_sets, tmp_path, case, error, words):
    with pytest.raises(error) as info:
        _train(tmp_path, f"data.root={bad_sets / case}", "trainer.fast_dev_run=true")
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_skip_bad_images_skips_and_lists_them(bad_sets, tmp_path):
    _train(tmp_path, f"data.root={bad_sets / 'corrupt'}", "data.skip_bad_images=true",
           "trainer.fast_dev_run=true", "data.val_fraction=0.25")
    listed = (tmp_path / "run" / "bad_images.txt").read_text()
    assert "broken.jpg" in listed


@pytest.mark.parametrize(("overrides", "error", "words"), [
    (["model.backbone=resnt18"], ConfigError, ["resnt18", "not a timm model", "resnet18"]),
    (["+augmentation.train.0={_target_: albumentations.RandomCropp}", "augmentation=basic"],
     ConfigError, ["RandomCropp", "RandomCrop"]),
    (["augmentation=basic", "augmentation.train.0.scale=[0.5,3]"], ConfigError, ["RandomResizedCrop"]),
    (["data.val_fraction=1.5"], ConfigError, ["data.val_fraction"]),
    (["data.image_size=big"], ConfigError, ["data.image_size"]),
])
def test_bad_config_values_give_a_message_naming_them(shapes_root, tmp_path, overrides, error, words):
    with pytest.raises(error) as info:
        _train(tmp_path, f"data.root={shapes_root}", "trainer.fast_dev_run=true", *overrides)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# the command line itself: a few cases end to end (each starts a Python process)
@pytest.mark.parametrize(("args", "words"), [
    # after the heavy imports (the path of test_finetune's failing pre-training child and of predict's CLI
    # cases); in process: test_bad_data_gives_a_message_naming_it[missing]
    pytest.param(["data=folder", "data.root=/no/such/folder"], ["/no/such/folder", "does not exist"],
                 marks=pytest.mark.scaling),
    pytest.param(["data=folder"], ["data.root", "required"], marks=pytest.mark.slow),
    (["model=resnt34"], ["model=resnt34", "resnet34"]),
    pytest.param(["trainer.max_epoch=3"], ["trainer.max_epoch", "no such key"], marks=pytest.mark.scaling),
    pytest.param(["model.backbone=resnt34"], ["resnt34", "resnet34"], marks=pytest.mark.slow),
])
def test_cli_prints_one_line_and_exits_2(args, words, tmp_path):
    proc = run_cli("train", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert not (tmp_path / "run" / "run.json").exists()  # nothing half-written


def _as_multirun_job(tmp_path: Path, overrides: list[str], monkeypatch):
    """A composed config whose HydraConfig says: job 0 of a multirun writing into ``tmp_path``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # restored after the test
    cfg = compose_cfg(tmp_path, overrides)
    hydra_cfg = OmegaConf.structured(HydraConfig.get())
    OmegaConf.set_readonly(hydra_cfg, False)
    with open_dict(hydra_cfg):
        hydra_cfg.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_cfg}))
    return cfg


@pytest.mark.parametrize("before", [None, {"status": "running", "task": "eval", "split": "val"}])
def test_a_failed_sweep_job_records_type_and_one_line_error_in_run_json(tmp_path, before, caplog, monkeypatch):
    import json

    from visionsweep.report.collect import load_job
    from visionsweep.utils.cli import guarded

    cfg = _as_multirun_job(tmp_path, [], monkeypatch)
    if before is not None:  # a task that wrote run.json and then failed without marking it
        (tmp_path / "run.json").write_text(json.dumps(before))

    @guarded
    def task(cfg):
        raise ConfigError("data.root '/x' does not exist:\n  give a folder")

    assert task(cfg) is None  # the sweep goes on
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "failed" and run["error_type"] == "ConfigError"
    assert run["error"] == "data.root '/x' does not exist: give a folder"
    assert all(run[k] == v for k, v in (before or {}).items() if k != "status")  # the rest is kept
    assert "job failed: data.root '/x' does not exist: give a folder" in caplog.text  # for humans
    job = load_job(tmp_path)
    assert (job.status, job.error_type, job.error) == ("failed", "ConfigError", run["error"])

    @guarded
    def bug(cfg):
        raise ZeroDivisionError("division by zero")

    (tmp_path / "run.json").unlink()
    bug(cfg)
    run = json.loads((tmp_path / "run.json").read_text())
    assert (run["error_type"], run["error"]) == ("ZeroDivisionError", "ZeroDivisionError: division by zero")


def test_a_mistyped_override_is_reported_before_torch_is_imported(tmp_path):
    """The entry points load torch, Lightning and timm (seconds) only once the command line is checked: a typo
    costs the user a fraction of that. Each command is run in a fresh process that records what it imported."""
    import subprocess
    import sys

    probe = ("import sys, runpy\n"
             "try:\n"
             "    runpy.run_module(sys.argv[1], run_name='__main__', alter_sys=True)\n"
             "finally:\n"
             "    print('HEAVY', sorted(m for m in ('torch', 'pytorch_lightning', 'timm', 'albumentations')"
             " if m in sys.modules), file=sys.stderr)\n")
    for module, typo in [("visionsweep.train", "model=resnt34"), ("visionsweep.eval", "splitt=val"),
                         ("visionsweep.predict", "tta=true inputt=x"), ("visionsweep.export", "format=onnx opsett=9"),
                         ("visionsweep.see", "see=kernels seee=1"), ("visionsweep.cache", "model=resnt34")]:
        proc = subprocess.run([sys.executable, "-c", probe, module, *typo.split(), f"hydra.run.dir={tmp_path}/r"],
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines[-2].startswith("error: bad override"), (module, proc.stderr[-2000:])
        assert lines[-1] == "HEAVY []", (module, lines[-1])
    assert not (tmp_path / "r").exists()


def test_timm_is_imported_without_wandb_and_wandb_still_imports_after():
    """timm imports wandb when installed (237 modules, ~0.5 s a job); a run without the wandb logger must not
    pay for it, and a run with it still gets the real package."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import visionsweep.models.backbones\n"
            "assert 'timm' in sys.modules, 'timm not imported'\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'wandb'))\n"
            "import wandb\n"
            "print(callable(wandb.init), 'timm.utils' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["[]", "True True"], proc.stdout


def test_a_sigterm_inside_any_command_exits_143_not_0():
    # Lightning turns a SIGTERM into SIGTERMException, a SystemExit without a code (exit status 0)
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from visionsweep.utils.cli import guarded

    def evaluating(cfg):
        raise SIGTERMException

    with pytest.raises(SystemExit) as info:
        guarded(evaluating)(None)
    assert info.value.code == 143
    with pytest.raises(SystemExit) as info:  # any other exit passes through as it is
        guarded(lambda cfg: sys.exit(3))(None)
    assert info.value.code == 3
