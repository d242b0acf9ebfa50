"""The one place a training job's composed config is completed, before anything is built or saved.

``config.yaml`` in the run dir must be what the job ran with, so everything the job derives from its
config is written into it here, once, at the start: the seed as an int, the checkpoint it resumes from
(and with it the split and the wandb run id of that run), the backbone's input size / crop / resize
method, and the wandb run's tags, group and name. Only the learning-rate finder
(:mod:`visionsweep.optim.lr_find`, ``tune.use_suggestion=true``) sets ``optimizer.lr`` later, and
still before ``config.yaml`` is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from visionsweep.builders import as_int, resolve_inputs
from visionsweep.models.backbones import InputConfig


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
    from visionsweep.utils.config import resume_checkpoint

    cfg.seed = as_int(cfg.seed, "seed", 0)
    resume = resume_checkpoint(cfg)  # data.split_dir and logger.wandb.id/resume of the resumed run
    if resume is not None and cfg.data.get("image_size") == "auto":
        cfg.data.image_size = _trained_image_size(resume) or "auto"  # go on at the size it was trained at
    inputs = resolve_inputs(cfg)  # data.image_size / crop_pct / interpolation from timm
    if cfg.get("logger") and cfg.logger.get("wandb"):
        label_wandb_run(cfg)
    return Resolved(inputs, resume)


def _trained_image_size(ckpt: Path) -> int | None:
    """``data.image_size`` of the run a checkpoint belongs to (its saved config.yaml), if it says."""
    from omegaconf import OmegaConf

    from visionsweep.checkpoints import run_dir_of

    saved = run_dir_of(ckpt) / "config.yaml"
    size = OmegaConf.select(OmegaConf.load(saved), "data.image_size") if saved.is_file() else None
    return int(size) if isinstance(size, int) else None


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
