"""Config helpers: the tree printed at start, and the checkpoint a training run resumes from."""

from __future__ import annotations

import logging
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("visionsweep.train")
PRINT_ORDER = ("data", "augmentation", "model", "optimizer", "scheduler", "trainer", "logger",
               "callbacks", "paths")


def print_config_tree(cfg: DictConfig, resolve: bool = True) -> None:
    """Print the composed config as a rich tree, main groups first.

    Args:
        cfg: the composed config.
        resolve: resolve interpolations before printing.
    """
    tree = rich.tree.Tree("CONFIG", style="bold")
    keys = [k for k in PRINT_ORDER if k in cfg] + [k for k in cfg if k not in PRINT_ORDER]
    for key in keys:
        branch = tree.add(str(key), style="bold cyan")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=resolve) if isinstance(node, DictConfig) or \
            OmegaConf.is_list(node) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rich.print(tree)


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
