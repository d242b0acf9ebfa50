"""The one place a training job's composed config is completed, before anything is built or saved.

``config.yaml`` in the run dir must be what the job ran with, so everything the job derives from its
config is written into it here, once, at the start: the seed as an int, the checkpoint it resumes from
(and with it the split and the wandb run id of that run), the backbone's input size / crop / resize
method, and the wandb run's tags, group and name. Only the learning-rate finder
(:mod:`visionsweep.lr_find`, ``tune.use_suggestion=true``) sets ``optimizer.lr`` later, and
still before ``config.yaml`` is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from visionsweep.builders import resolve_inputs
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
    if cfg.get("logger") and cfg.logger.get("wandb"):
        label_wandb_run(cfg)
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


def label_wandb_run(cfg: DictConfig) -> None:
    """Tag the wandb run by arch, augmentation and seed; in a sweep, group its jobs and name each one.

    wandb's grouping and parallel-coordinates views then compare the configurations directly. The
    group and name are MLflow's experiment and run names (:func:`visionsweep.dashboards.sweep_names`);
    values set in the config win.
    """
    from visionsweep.dashboards import sweep_names
    from visionsweep.utils.cli import is_multirun

    node = cfg.logger.wandb
    arch, aug = cfg.model.get("backbone", "?"), cfg.augmentation.get("name", "?")
    tags = [str(t) for t in (node.get("tags") or [])]
    node.tags = list(dict.fromkeys(tags + [f"arch={arch}", f"aug={aug}", f"seed={cfg.seed}"]))
    if is_multirun():
        group, name = sweep_names(cfg.get("task_name", "train"), arch, aug, cfg.seed)
        node.group = node.get("group") or group
        node.name = node.get("name") or name


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
