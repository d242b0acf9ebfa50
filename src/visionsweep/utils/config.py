"""Config helpers: the tree printed at start, and locating checkpoints and their runs."""

from __future__ import annotations

import logging
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

from visionsweep.errors import ConfigError

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


def find_latest_checkpoint(log_dir: str | Path, task_name: str = "train") -> Path:
    """The newest ``last.ckpt`` under ``<log_dir>/<task_name>/`` (runs and sweep jobs)."""
    root = Path(log_dir) / task_name
    found = sorted(root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"ckpt_path=latest: no checkpoints/last.ckpt under {root}")
    return found[-1]


def run_dir_of(ckpt_path: str | Path) -> Path:
    """The run dir a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` → ``<run>``)."""
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def check_checkpoint(ckpt_path: str | None) -> Path:
    """Resolve and check a ``ckpt_path`` given by the user."""
    if not ckpt_path:
        raise ConfigError("ckpt_path is required: ckpt_path=<run>/checkpoints/<name>.ckpt")
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path '{ckpt_path}' does not exist")
    return path.resolve()


def resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint of ``ckpt_path`` (a path or ``latest``); points data and wandb at its run."""
    from visionsweep import runinfo

    if not cfg.get("ckpt_path"):
        return None
    ckpt = (find_latest_checkpoint(cfg.paths.log_dir, cfg.task_name) if cfg.ckpt_path == "latest"
            else check_checkpoint(cfg.ckpt_path))
    old_run = run_dir_of(ckpt)
    if not cfg.data.get("split_dir") and (old_run / "splits").is_dir():
        cfg.data.split_dir = str(old_run / "splits")  # same split as the run being resumed
    wandb_id = runinfo.load(old_run).get("wandb_id")
    if wandb_id and cfg.get("logger") and cfg.logger.get("wandb"):
        cfg.logger.wandb.id, cfg.logger.wandb.resume = wandb_id, "allow"
    log.info("resuming from %s", ckpt)
    return ckpt
