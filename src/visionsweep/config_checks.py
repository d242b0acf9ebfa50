"""Config values checked before anything is built or written: a bad value stops the run in one line that
names the key and a value that works (``optimizer.lr=-1``, ``trainer.devices=0``, ``calibrate=true`` with
``task=multilabel``)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from visionsweep import parallel
from visionsweep.errors import ConfigError
from visionsweep.utils import checks


def check_config(cfg: DictConfig) -> None:
    """One pass over the numeric keys of the data, model, optimizer, scheduler, trainer, callbacks and
    tune groups: a bad value stops the run in one line naming the key and a value that works.

    Raises:
        ConfigError: The first bad value.
    """
    import torch

    from visionsweep.optim import build_optimizer, check_scheduler, check_tune

    parallel.resolve_threads(cfg.get("threads", "auto"), None)  # (a sweep job gets here despite a bad one)
    for name, node in (cfg.get("callbacks") or {}).items():  # switches: builders.build_callbacks reads them
        if isinstance(node, (dict, DictConfig)) and "enabled" in node:
            checks.flag(node.get("enabled"), f"callbacks.{name}.enabled")
    data = cfg.get("data") or {}
    if "batch_size" in data:
        checks.whole(data.batch_size, "data.batch_size", 1, None, 32)
    checks.keys(cfg.get("model") or {}, _MODEL_VALUES, "model.")
    checks.keys(cfg, {"calibrate": checks.flag, "cost.enabled": checks.flag, "cost.onnx": checks.flag,
                      "cost.batch": lambda v, k: checks.whole(v, k, 1, None, 32),
                      "cost.calls": lambda v, k: checks.whole(v, k, 1, None, 30),
                      "cost.budget_s": lambda v, k: checks.number(v, k, 0, None, 10, low_open=True),
                      "cost.opset": lambda v, k: checks.whole(v, k, 7, None, 18)})
    model = cfg.get("model") or {}
    if checks.flag(cfg.get("calibrate", False), "calibrate") and (
            model.get("multilabel") or "Segmenter" in str(model.get("_target_"))):
        task = "multilabel" if model.get("multilabel") else "segment"
        raise ConfigError(f"calibrate=true fits the softmax temperature of a single-label classifier: drop it "
                          f"with task={task}")
    check_trainer(cfg.get("trainer") or {})
    for name, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, (dict, DictConfig)):
            checks.keys(node, _CALLBACK_VALUES, f"callbacks.{name}.")
    if cfg.get("tune"):
        check_tune(OmegaConf.to_container(cfg.tune, resolve=True))
    if cfg.get("optimizer"):
        opt = OmegaConf.to_container(cfg.optimizer, resolve=True)
        if "lr" in opt:
            checks.number(opt["lr"], "optimizer.lr", 0, None, 0.003, low_open=True)
        optimizer = build_optimizer(opt, [torch.nn.Parameter(torch.zeros(1))])
        if cfg.get("scheduler"):
            check_scheduler(OmegaConf.to_container(cfg.scheduler, resolve=True), optimizer)


def _fraction_below_1(v: Any, k: str) -> Any:
    return checks.fraction(v, k, 0.1, high_open=True)


def _non_negative(v: Any, k: str) -> Any:
    return checks.number(v, k, 0, None, 0)


def _count(v: Any, k: str) -> Any:
    return checks.whole(v, k, 0, None, 1)


#: model.<key> → its check (classifier and segmenter); null values are left to the model's default
_MODEL_VALUES = {
    "drop_rate": _fraction_below_1, "label_smoothing": _fraction_below_1,
    "ema_decay": lambda v, k: checks.fraction(v, k, 0.999, low_open=True, high_open=True),
    "mixup.mixup_alpha": _non_negative, "mixup.cutmix_alpha": _non_negative,
    "mixup.prob": lambda v, k: checks.fraction(v, k, 1.0), "mixup.switch_prob": lambda v, k: checks.fraction(v, k),
    "mixup.mode": lambda v, k: checks.choice(v, k, ("batch", "pair", "elem")),
    "encoder_depth": lambda v, k: checks.whole(v, k, 1, 5, 5), "overlay_count": _count,
    "ignore_index": lambda v, k: checks.whole(v, k, -100, 255, 255),
    "channels_last": checks.flag, "pretrained": checks.flag, "weight_decay_norm_bias": checks.flag,
    "multilabel": checks.flag,  # (model.loss: each module checks its own choices: ce/bce/asl, ce/dice/dice_ce)
}
#: callbacks.<any>.<key> → its check
_CALLBACK_VALUES = {
    "save_top_k": lambda v, k: checks.whole(v, k, -1, None, 1, also=" (-1: all)"),
    "last_every_s": _non_negative, "every_n_epochs": _count, "patience": _count,
    "min_delta": _non_negative, "threshold": lambda v, k: checks.fraction(v, k, 0.2),
    "warmup_batches": _count, "freeze_epochs": _count,
    "lr_mult": lambda v, k: checks.number(v, k, 0, None, 100.0, low_open=True),
    "pct_start": lambda v, k: checks.fraction(v, k, 0.3, low_open=True, high_open=True),
    "div": lambda v, k: checks.number(v, k, 0, None, 5.0, low_open=True),
    "div_final": lambda v, k: checks.number(v, k, 0, None, 100000.0, low_open=True),
}
_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
           "overfit_batches")


def check_trainer(node: Any) -> None:
    """The trainer's numeric keys, checked before the Trainer is built (it is built after run.json).

    Raises:
        ConfigError: A value Lightning would reject late or not at all (``max_epochs=-1`` with a
            one-cycle schedule never ends; ``accumulate_grad_batches=0`` divides by zero).
    """
    get = node.get
    steps = get("max_steps", -1)
    steps = -1 if steps is None else checks.whole(steps, "trainer.max_steps", -1, None, -1, also=" (-1: no limit)")
    if steps == 0:
        raise checks.fail("trainer.max_steps", 0, "-1 (no limit) or a whole number >= 1", -1)
    epochs = get("max_epochs")
    if epochs is not None:
        n = checks._as_whole(epochs)
        if n is None or not (n >= 1 or (n == -1 and steps >= 1)):
            raise checks.fail("trainer.max_epochs", epochs, "a whole number >= 1 (-1 only with trainer.max_steps "
                              ">= 1)", 10)
    for key in ("min_epochs", "min_steps"):
        if get(key) is not None:
            checks.whole(get(key), f"trainer.{key}", 0, None, 1)
    for key in _LIMITS:
        value = get(key)
        if value is None:
            continue
        if isinstance(value, float):
            checks.fraction(value, f"trainer.{key}", 1.0, low_open=key == "limit_train_batches")
        else:
            lowest = 1 if key == "limit_train_batches" else 0
            checks.whole(value, f"trainer.{key}", lowest, None, 1.0, also=" (batches) or a fraction from 0 to 1")
    rules = {"accumulate_grad_batches": (1, 1), "log_every_n_steps": (0, 10), "num_nodes": (1, 1),
             "check_val_every_n_epoch": (1, 1), "num_sanity_val_steps": (-1, 2)}
    for key, (lowest, example) in rules.items():
        if get(key) is not None:
            checks.whole(get(key), f"trainer.{key}", lowest, None, example)
    if get("gradient_clip_val") is not None:
        checks.number(get("gradient_clip_val"), "trainer.gradient_clip_val", 0, None, 1.0)
    interval = get("val_check_interval")
    if interval is not None:
        if isinstance(interval, float):
            checks.fraction(interval, "trainer.val_check_interval", 1.0, low_open=True)
        else:
            checks.whole(interval, "trainer.val_check_interval", 1, None, 1.0, also=" (batches) or a fraction")
    fast = get("fast_dev_run")
    if fast is not None and not isinstance(fast, bool):
        checks.whole(fast, "trainer.fast_dev_run", 0, None, "true", also=" (batches) or true/false")
    for key in ("benchmark", "enable_checkpointing", "enable_progress_bar", "enable_model_summary"):
        if get(key) is not None:
            checks.flag(get(key), f"trainer.{key}")
    if get("deterministic") is not None and not isinstance(get("deterministic"), bool):
        checks.choice(get("deterministic"), "trainer.deterministic", ("warn", "true", "false"))
    if get("precision") is not None:
        checks.choice(get("precision"), "trainer.precision", _PRECISIONS)
    accelerator = get("accelerator")
    if isinstance(accelerator, str):
        from pytorch_lightning.accelerators import AcceleratorRegistry

        checks.choice(accelerator, "trainer.accelerator", ["auto", "gpu", *AcceleratorRegistry.available_accelerators()])
    _check_devices(get("devices"), accelerator)


_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "32", "16", "bf16", "64",
               32, 16, 64, "transformer-engine", "transformer-engine-float16")


def _check_devices(devices: Any, accelerator: Any) -> None:
    """``trainer.devices``: auto, -1, a count >= 1 (on a CPU at most its cores: each is a process), or ids."""
    if devices is None or isinstance(devices, (list, tuple)) or not isinstance(devices, (int, str)):
        return
    if isinstance(devices, str) and (devices.strip().lower() == "auto" or "," in devices):
        return
    n = checks.whole(devices, "trainer.devices", -1, None, 1, also=" (processes), -1 (all) or auto")
    if n == 0:
        raise checks.fail("trainer.devices", devices, "a whole number >= 1, -1 (all) or auto", 1)
    import torch

    on_cpu = str(accelerator).lower() == "cpu" or (str(accelerator).lower() == "auto" and not torch.cuda.is_available())
    from visionsweep.parallel import node_cores

    if on_cpu and n > max(8, node_cores()):
        raise checks.fail("trainer.devices", devices, f"at most {max(8, node_cores())} on this CPU node (each device "
                          f"is a training process; it has {node_cores()} cores)", 2)
