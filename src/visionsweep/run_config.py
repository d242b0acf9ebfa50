"""The one place a training job's composed config is completed and checked, before anything is built or saved.

``config.yaml`` in the run dir must be what the job ran with, so everything the job derives from its
config is written into it here, once, at the start: the seed as an int, the checkpoint it resumes from
(and with it the split and the wandb run id of that run), the backbone's input size / crop / resize
method, and the dashboards' run names (wandb's tags, group and name; MLflow's experiment and run).
Only the learning-rate finder
(:mod:`visionsweep.lr_find`, ``tune.use_suggestion=true``) sets ``optimizer.lr`` later, and
still before ``config.yaml`` is written.

:func:`check_config` checks the values: a bad one stops the run in one line that names the key and a
value that works (``optimizer.lr=-1``, ``trainer.devices=0``, ``calibrate=true`` with ``task=multilabel``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from visionsweep import parallel
from visionsweep.builders import resolve_inputs
from visionsweep.errors import ConfigError
from visionsweep.models.backbones import InputConfig
from visionsweep.utils import checks

log = logging.getLogger("visionsweep.train")
# what shapes a run's weights, data and schedule: a resumed run takes these from the run it resumes
SHAPING = ("task", "seed", "model", "data", "augmentation", "optimizer", "scheduler", "trainer.max_epochs",
           "trainer.max_steps", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.precision")
# ... of which these may be given anew: training on for more epochs (the schedule's own check refuses a
# one-cycle / cosine schedule planned for fewer, in one line)
PLANNED = ("scheduler", "trainer.max_epochs", "trainer.max_steps")
# ... except where the data lives and how it is loaded, when given (the data's fingerprint is checked on
# resume); data.split_dir is the resumed run's split, set by resume_checkpoint
FREE = ("data.root", "data.split_dir", "data.num_workers", "data.pin_memory", "data.persistent_workers",
        "data.prefetch_factor", "data.cache", "data.cache_dir", "data.skip_bad_images", "data.verify_images")


@dataclass(frozen=True)
class Resolved:
    """What completing the config found out besides the config itself."""

    inputs: InputConfig
    resume: Path | None  # the checkpoint to resume from (``ckpt_path``), checked


def complete(cfg: DictConfig) -> Resolved:
    """Fill in everything the job derives from ``cfg``, in place; idempotent (DDP ranks > 0 and a
    re-run from ``--config-dir <run>`` see their already completed config again).

    Args:
        cfg: The composed training config (``conf/train.yaml`` + overrides).

    Returns:
        The backbone's input config and the checkpoint to resume from.

    Raises:
        ConfigError: A bad seed, checkpoint or input size, in one line naming the key.
    """
    resume = resume_checkpoint(cfg)  # data.split_dir and logger.wandb.id/resume of the resumed run
    if resume is not None:
        adopt_resumed_run(cfg, resume, _command_line())
    cfg.seed = checks.whole(cfg.seed, "seed", 0, 2**32 - 1, 42)  # numpy's seed range
    inputs = resolve_inputs(cfg)  # data.image_size / crop_pct / interpolation from timm
    label_loggers(cfg)
    return Resolved(inputs, resume)


def adopt_resumed_run(cfg: DictConfig, ckpt: Path, given: list[str]) -> None:
    """Make ``cfg`` train the run ``ckpt`` belongs to: what shaped its weights, data and schedule is its.

    Keys of :data:`SHAPING` not given on the command line are taken from that run's saved config.yaml
    (``ckpt_path=latest`` after a resnet18 run resumes a resnet18, whatever the defaults say). A key
    given on the command line must agree with the run, or the resume is refused in one line. Keys of
    :data:`FREE` (where the data lives, how it is loaded) stay as given.

    Args:
        cfg: The training config, completed in place.
        ckpt: The checkpoint resumed from (checked).
        given: The command line's overrides (``key=value``; ``experiment=x`` counts as giving every key).

    Raises:
        ConfigError: A given key differs from the resumed run's value.
    """
    from omegaconf import OmegaConf, open_dict

    from visionsweep.checkpoints import run_dir_of
    from visionsweep.errors import ConfigError

    saved = run_dir_of(ckpt) / "config.yaml"
    try:
        old = OmegaConf.load(saved)
    except Exception:  # no (readable) config.yaml: resume as configured, as before
        log.warning("resuming %s: its run has no readable config.yaml; training with this config as given", ckpt)
        return
    keys = [o.split("=", 1)[0].lstrip("+~") for o in given if "=" in o]
    everything = any(k.split("@")[0] == "experiment" for k in keys)
    for section in SHAPING:
        if OmegaConf.select(old, section, default=_MISSING) is _MISSING:
            continue  # the old run predates this key
        touched = [k for k in keys if k == section or k.startswith(section + ".") or section.startswith(k + ".")]
        for key in ([section] if everything and not touched else touched):
            scope = key if key.startswith(section) else section
            for leaf, now in _leaves(OmegaConf.select(cfg, scope), scope):
                was = OmegaConf.select(old, leaf, default=_MISSING)
                if leaf in FREE or any(leaf == f or leaf.startswith(f + ".") for f in FREE + PLANNED) \
                        or now in ("auto", None) or was is _MISSING or now == was:
                    continue
                raise ConfigError(
                    f"ckpt_path resumes {run_dir_of(ckpt)}, trained with {leaf}={_show(was)}, but this run sets "
                    f"{leaf}={_show(now)}: drop {key}=... (a resumed run keeps what shaped its weights, data and "
                    "schedule), or start a new run without ckpt_path")
        free = {f: OmegaConf.select(cfg, f) for f in FREE + PLANNED if (f == section or f.startswith(section + "."))
                and (f == "data.split_dir" or any(f == k or f.startswith(k + ".") for k in keys))}
        with open_dict(cfg):
            if "." in section:
                OmegaConf.update(cfg, section, OmegaConf.select(old, section), merge=False)
            else:
                cfg[section] = OmegaConf.merge(cfg[section], old[section]) \
                    if OmegaConf.is_dict(cfg.get(section)) and OmegaConf.is_dict(old[section]) else old[section]
            for f, value in free.items():
                OmegaConf.update(cfg, f, value, merge=False)
    log.info("resuming %s with its run's %s", ckpt, ", ".join(s for s in SHAPING if s in old or "." in s))


_MISSING = object()


def _leaves(node: object, prefix: str) -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf under ``node`` (the node itself when it is not a dict)."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_dict(node):
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_list(node) else node
        return [(prefix, value)]
    out: list[tuple[str, object]] = []
    for k in node:
        out += _leaves(node._get_node(k) if OmegaConf.is_missing(node, k) else node[k], f"{prefix}.{k}")
    return out


def _show(value: object) -> str:
    return str(value) if not isinstance(value, str) else value


def _command_line() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def label_loggers(cfg: DictConfig) -> None:
    """Name this job's wandb and MLflow runs in its config, so ``config.yaml`` records what the dashboards show.

    One wandb group / MLflow experiment per sweep and one run per job, named by what it compares
    (:func:`visionsweep.callbacks.hparams.sweep_names`); wandb also gets ``arch=``/``aug=``/``seed=`` tags
    (MLflow and TensorBoard take arch, aug and seed as arguments of their own, interpolated in
    ``conf/logger``). Values set in the config win. A single wandb run keeps wandb's own name.
    """
    loggers = cfg.get("logger") or {}
    wandb, mlflow = loggers.get("wandb"), loggers.get("mlflow")
    if not (wandb or mlflow):
        return
    from visionsweep.callbacks.hparams import sweep_names
    from visionsweep.utils.cli import is_multirun

    arch, aug = cfg.model.get("backbone", "?"), cfg.augmentation.get("name", "?")
    experiment, run = sweep_names(cfg.get("task_name", "train"), arch, aug, cfg.seed)
    if wandb:
        tags = [str(t) for t in (wandb.get("tags") or [])]
        wandb.tags = list(dict.fromkeys(tags + [f"arch={arch}", f"aug={aug}", f"seed={cfg.seed}"]))
        if is_multirun():
            wandb.group = wandb.get("group") or experiment
            wandb.name = wandb.get("name") or run
    if mlflow:
        mlflow.experiment_name = mlflow.get("experiment_name") or experiment
        mlflow.run_name = mlflow.get("run_name") or run


def resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint of ``ckpt_path`` (a path or ``latest``); points data and wandb at its run.

    The file is checked weights-only (:func:`visionsweep.checkpoints.check_resumable`) before
    Lightning reads it: a pickle with code, a truncated file or the other model kind stop here in one line.
    """
    if not cfg.get("ckpt_path"):
        return None
    from visionsweep import checkpoints, runinfo

    kind = checkpoints.kind_of_target(cfg.model.get("_target_"))
    ckpt = checkpoints.check_resumable(cfg.ckpt_path, cfg.paths.log_dir, cfg.task_name, kind)
    old_run = checkpoints.run_dir_of(ckpt)
    if not cfg.data.get("split_dir") and (old_run / "splits").is_dir():
        cfg.data.split_dir = str(old_run / "splits")  # same split as the run being resumed
    wandb_id = runinfo.load(old_run).get("wandb_id")
    if wandb_id and cfg.get("logger") and cfg.logger.get("wandb"):
        cfg.logger.wandb.id, cfg.logger.wandb.resume = wandb_id, "allow"
    log.info("resuming from %s", ckpt)
    return ckpt


def plots_wanted(cfg: DictConfig) -> bool:
    """Whether this job draws ``<run>/plots`` (:mod:`visionsweep.analysis.run_plots`): ``plots`` is ``auto``
    (a single run does, a sweep's job does not: the report plots its jobs), true or false.

    Raises:
        ConfigError: ``plots`` is none of these (one line).
    """
    from visionsweep.utils.cli import is_multirun

    choice = cfg.get("plots")
    if choice is None or str(choice).strip().lower() == "auto":
        return not is_multirun()
    try:
        return checks.flag(choice, "plots")
    except ConfigError:
        raise ConfigError(f"plots={choice}: give auto (a single run draws its plots, a sweep's jobs do not), "
                          "true or false") from None


def check_config(cfg: DictConfig) -> None:
    """One pass over the numeric keys of the data, model, optimizer, scheduler, trainer, callbacks and
    tune groups: a bad value stops the run in one line naming the key and a value that works.

    Raises:
        ConfigError: The first bad value.
    """
    import torch

    from visionsweep.optim import build_optimizer, check_scheduler, check_tune

    parallel.resolve_threads(cfg.get("threads", "auto"), None)  # (a sweep job gets here despite a bad one)
    plots_wanted(cfg)
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
