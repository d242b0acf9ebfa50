"""Model EMA: an exponential moving average of the weights, evaluated and checkpointed.

Built on Lightning's :class:`~pytorch_lightning.callbacks.WeightAveraging`: validation runs on the
averaged weights (so ``val/acc`` and the "best" checkpoint are the EMA's), every checkpoint's
``state_dict`` holds the averaged weights (the raw ones go to ``current_model_state`` for resuming),
and the model ends training with the averaged weights. Enabled with ``model.ema_decay=0.999``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn


class EMA(WeightAveraging):
    """EMA of parameters and buffers, with timm's warm-up: decay_t = min(decay, (1 + t) / (10 + t)).

    The warm-up keeps short runs meaningful: with a plain 0.999 the average of a 100-step run would
    still be mostly the initial weights.

    Args:
        decay: the EMA decay once warmed up (0.999 ≈ an average over the last ~1,000 steps).
        warmup: use the warm-up above (as ``timm.utils.ModelEmaV3(use_warmup=True)``).
        device: where to keep the averaged copy (None: the model's device; "cpu" saves GPU memory).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, device: str | None = None) -> None:
        self.decay, self.warmup = float(decay), bool(warmup)
        super().__init__(device=device, use_buffers=True, avg_fn=self._average)

    def _average(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        decay = min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay
        if not averaged.is_floating_point():  # counters (BatchNorm's num_batches_tracked): follow the model
            return current.clone()
        return averaged.lerp(current, 1.0 - decay)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Lightning's version reloads the raw weights whenever the averaged model exists, which after a
        # fit would make trainer.test(ckpt_path="best") test the raw weights: only restore them to resume.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
