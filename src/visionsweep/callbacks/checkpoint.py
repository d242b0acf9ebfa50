"""Checkpoints that cost what they are for: the best as weights only, the last with the full state.

A resnet34 checkpoint with AdamW's moments is 3x its weights (255 MB vs 85 MB; vgg19: 1.6 GB vs
0.55 GB), and Lightning writes two per run. Only a resume needs the optimizer, scheduler, loop and
random states, and only from the last checkpoint, and only until the job has finished; eval, predict,
export and ``see`` read weights and hyper-parameters. So the best checkpoint is weights-only, and a
finished job drops its last checkpoint unless ``keep_last`` says otherwise (``auto``: kept by a
single run, which ``ckpt_path=latest`` may continue with more epochs; dropped by sweep jobs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with a weights-only best file, one ``last.ckpt`` and a disk policy.

    Args:
        keep_last: keep ``last.ckpt`` once the job has finished: ``true``, ``false`` or ``auto``
            (kept in a single run, dropped in a sweep job).
        **kwargs: ``ModelCheckpoint`` arguments (``dirpath``, ``monitor``, ``save_top_k``, ...).
    """

    def __init__(self, keep_last: bool | str = "auto", **kwargs: Any) -> None:
        kwargs.setdefault("enable_version_counter", False)  # a resumed job overwrites, never last-v1.ckpt
        super().__init__(**kwargs)
        if keep_last not in (True, False, "auto"):
            from visionsweep.errors import ConfigError

            raise ConfigError(f"callbacks.model_checkpoint.keep_last={keep_last}: give true, false or auto")
        self.keep_last = keep_last

    def _is_last(self, filepath: str) -> bool:
        return Path(filepath).name == f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        configured = self.save_weights_only
        self.save_weights_only = configured or not self._is_last(filepath)
        try:
            super()._save_checkpoint(trainer, filepath)
        finally:
            self.save_weights_only = configured

    def drop_last(self, trainer: pl.Trainer, multirun: bool) -> Path | None:
        """Remove ``last.ckpt`` of a finished job when the policy says so; returns what was removed.

        Args:
            trainer: The trainer whose fit has ended normally.
            multirun: True inside a sweep job (what ``auto`` decides on).
        """
        keep = self.keep_last if self.keep_last != "auto" else not multirun
        last = Path(self.last_model_path) if self.last_model_path else None
        if keep or last is None or not last.is_file() or not trainer.is_global_zero:
            return None
        last.unlink()
        self.last_model_path = ""
        log.info("finished: dropped %s (best kept as weights only; keep it with "
                 "callbacks.model_checkpoint.keep_last=true)", last)
        return last
