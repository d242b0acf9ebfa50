"""Every numeric config value a user can type: a bad one stops in one line naming the key (no traceback,
no run dir), before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from visionsweep.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

BAD = [  # (overrides, the key named)
    ("trainer.max_epochs=-1", "trainer.max_epochs"), ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("trainer.max_epochs=abc", "trainer.max_epochs"), ("trainer.max_epochs=0.5", "trainer.max_epochs"),
    ("trainer.max_steps=0", "trainer.max_steps"), ("trainer.max_steps=-2", "trainer.max_steps"),
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches"),
    ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches"),
    ("trainer.limit_val_batches=abc", "trainer.limit_val_batches"),
    ("trainer.overfit_batches=-1", "trainer.overfit_batches"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("trainer.accumulate_grad_batches=0.5", "trainer.accumulate_grad_batches"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch"),
    ("trainer.num_sanity_val_steps=abc", "trainer.num_sanity_val_steps"),
    ("trainer.log_every_n_steps=-1", "trainer.log_every_n_steps"),
    ("trainer.precision=8", "trainer.precision"), ("trainer.devices=0", "trainer.devices"),
    ("trainer.devices=1000", "trainer.devices"), ("trainer.fast_dev_run=-1", "trainer.fast_dev_run"),
    ("trainer.deterministic=abc", "trainer.deterministic"), ("trainer.accelerator=abc", "trainer.accelerator"),
    ("data.image_size=100000", "data.image_size"), ("data.image_size=0", "data.image_size"),
    ("data.crop_pct=0", "data.crop_pct"), ("data.crop_pct=abc", "data.crop_pct"),
    ("data.crop_pct=1e-9", "data.crop_pct"), ("data.batch_size=abc", "data.batch_size"),
    ("model.drop_rate=1.5", "model.drop_rate"), ("model.label_smoothing=-1", "model.label_smoothing"),
    ("model.mixup.prob=2", "model.mixup.prob"), ("optimizer.lr=0", "optimizer.lr"),
    ("optimizer.lr=abc", "optimizer.lr"),
    ("scheduler.pct_start=0", "scheduler.pct_start"), ("scheduler.div_factor=-1", "scheduler.div_factor"),
    ("scheduler=cosine scheduler.eta_min=abc", "scheduler.eta_min"),
    ("callbacks.model_checkpoint.save_top_k=-2", "callbacks.model_checkpoint.save_top_k"),
    ("callbacks.throughput.threshold=abc", "callbacks.throughput.threshold"),
    ("callbacks=early_stopping callbacks.early_stopping.patience=-1", "callbacks.early_stopping.patience"),
    ("training=fine_tune callbacks.finetune.pct_start=0", "callbacks.finetune.pct_start"),
    ("tune.lr_find=true tune.min_lr=-1", "tune.min_lr"), ("tune.lr_find=true tune.num_training=0", "tune.num_training"),
    ("tune.lr_find=true tune.max_lr=1e-9", "tune.max_lr"), ("seed=1e30", "seed"),
    ("threads=0", "threads"), ("threads=many", "threads"),  # (a sweep job's ThreadBudget only logs it)
    ("callbacks.compile.enabled=maybe", "callbacks.compile.enabled"),  # not silently "on"
]


def test_a_callback_switch_that_is_not_true_or_false_is_one_line(tmp_path):
    from conftest import compose_cfg

    from visionsweep import builders

    with pytest.raises(ConfigError, match=r"^callbacks\.compile\.enabled=maybe"):  # not silently "on"
        builders.build_callbacks(compose_cfg(tmp_path, ["callbacks.compile.enabled=maybe"]))


def _checked(tmp_path: Path, overrides: list[str]) -> None:
    """What train.py does with the config before writing anything (run_config.complete, then the checks)."""
    from conftest import compose_cfg

    from visionsweep import run_config

    cfg = compose_cfg(tmp_path / "run", overrides)
    run_config.complete(cfg)
    run_config.check_config(cfg)


@pytest.mark.parametrize(("overrides", "key"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_value_is_one_line_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError) as info:
        _checked(tmp_path, overrides.split())
    message = str(info.value)
    assert message.startswith(f"{key}="), message
    assert "\n" not in message and "give" in message


@pytest.mark.parametrize("overrides", ["trainer.max_epochs=-1 trainer.max_steps=4", "trainer.limit_val_batches=0",
                                       "trainer.log_every_n_steps=0", "trainer.precision=bf16-mixed",
                                       "data.crop_pct=0.875", "data.image_size=64"])
def test_values_that_work_pass(tmp_path, overrides):
    _checked(tmp_path, overrides.split())


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"batch_size": "abc"}, "data.batch_size"), ({"split_seed": -1}, "data.split_seed"),
    ({"split_seed": 0.5}, "data.split_seed"), ({"num_workers": 0.5}, "data.num_workers"),
    ({"num_workers": 100000}, "data.num_workers"), ({"pin_memory": "abc"}, "data.pin_memory"),
    ({"persistent_workers": "abc"}, "data.persistent_workers"), ({"val_fraction": "abc"}, "data.val_fraction"),
    ({"image_size": 100000}, "data.image_size"), ({"folds": 5, "fold": 5}, "data.fold"),
    ({"folds": "abc"}, "data.folds"), ({"folds": 5, "fold": "abc"}, "data.fold"),
])
def test_data_module_values(tmp_path, kwargs, key):
    from visionsweep.data.folder import FolderDataModule

    with pytest.raises(ConfigError, match=rf"^{key}="):
        FolderDataModule(str(tmp_path), image_size=kwargs.pop("image_size", 32), **kwargs)


def test_checks_accept_what_works_and_name_the_key():
    from visionsweep.utils import checks

    assert checks.whole("12", "k", 1) == 12 and checks.whole(1e3, "k", 1) == 1000
    assert checks.fraction("0.5", "k") == 0.5 and checks.flag("false", "k") is False
    assert checks.check_image_size(8192) == 8192
    for call in (lambda: checks.whole(True, "a.b", 0), lambda: checks.whole(float("inf"), "a.b"),
                 lambda: checks.number("nan", "a.b"), lambda: checks.choice("x", "a.b", ("y", "z")),
                 lambda: checks.check_image_size(4096, 1024)):
        with pytest.raises(ConfigError, match=r"^a\.b=|^data\.image_size=4096: .*GiB"):
            call()


# one case end to end (a Python process each, ~9 s): the in-process tests above cover every key's message
@pytest.mark.scaling  # CLI end to end, same path as a case kept in make test (test_cli.py's data.root case): make test-scaling
@pytest.mark.parametrize(("override", "key"), [("data.image_size=100000", "data.image_size"), ("threads=0", "threads")])
def test_cli_bad_value_is_one_line_and_leaves_no_run_dir(tmp_path, override, key):
    run = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "visionsweep.train", override, "logger=csv", f"hydra.run.dir={run}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {key}="), proc.stderr[-2000:]
    assert not run.exists()


ENTRY_BAD = [  # (entry point, overrides, the key named): checked before the checkpoint is read
    ("eval", "batch_size=0", "batch_size"), ("eval", "batch_size=abc", "batch_size"),
    ("predict", "batch_size=-1", "batch_size"), ("predict", "show=abc", "show"), ("predict", "tta=maybe", "tta"),
    ("predict", "skip_bad_images=2", "skip_bad_images"), ("export", "opset=999", "opset"),
    ("export", "opset=abc", "opset"), ("export", "tolerance=0", "tolerance"), ("export", "softmax=abc", "softmax"),
    ("see", "see=errors see.top_k=0", "see.top_k"), ("see", "see=occlusion see.window=-3", "see.window"),
    ("see", "see=occlusion see.stride=0.5", "see.stride"), ("see", "see=kernels see.max_side=100000", "see.max_side"),
    ("see", "see=augment see.variants=abc", "see.variants"), ("see", "see=augment seed=-1", "seed"),
]


@pytest.mark.parametrize(("entry", "overrides", "key"), ENTRY_BAD, ids=[f"{e}:{o}" for e, o, _ in ENTRY_BAD])
def test_entry_point_values_are_one_line_naming_the_key(tmp_path, entry, overrides, key):
    import importlib

    from conftest import compose_cfg

    run = {"eval": "evaluate", "predict": "predict", "export": "export", "see": "see"}[entry]
    fn = getattr(importlib.import_module(f"visionsweep.{entry}"), run)
    extra = [] if entry == "see" else [f"ckpt_path={tmp_path / 'none.ckpt'}"]
    extra += [f"input={tmp_path}"] if entry == "predict" else []
    cfg = compose_cfg(tmp_path / "out", [*extra, *overrides.split()], config_name=entry)
    with pytest.raises(ConfigError) as info:
        fn(cfg)
    message = str(info.value)
    assert message.startswith(f"{key}=") and "give" in message and "\n" not in message, message
