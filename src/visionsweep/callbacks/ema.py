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


def decay_at(decay: float, num_averaged: int, warmup: bool = True) -> float:
    """The decay of the update after ``num_averaged`` updates: ``min(decay, (1 + t) / (10 + t))`` with warm-up.

    The warm-up is TensorFlow's ``ExponentialMovingAverage(num_updates=t)`` one (timm's ``ModelEmaV3``
    warms up differently, with ``1 - (1 + t / gamma) ** -power``).
    """
    t = float(num_averaged)
    return min(decay, (1.0 + t) / (10.0 + t)) if warmup else decay


class EMA(WeightAveraging):
    """EMA of parameters and buffers, with a warm-up: ``decay_t = min(decay, (1 + t) / (10 + t))``.

    The warm-up keeps short runs meaningful: with a plain 0.999 the average of a 100-step run would
    still be mostly the initial weights. It is TensorFlow's ``ExponentialMovingAverage(num_updates=t)``
    rule; timm's ``ModelEmaV3(use_warmup=True)`` uses another, ``1 - (1 + t / gamma) ** -power``.
    The update runs on whole lists of tensors (``torch._foreach_lerp_``, through ``AveragedModel``'s
    ``multi_avg_fn``), one kernel per device and dtype instead of one per tensor.

    Args:
        decay: the EMA decay once warmed up (0.999 ≈ an average over the last ~1,000 steps).
        warmup: use the warm-up above.
        device: where to keep the averaged copy (None: the model's device; "cpu" saves GPU memory).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, device: str | None = None) -> None:
        self.decay, self.warmup = float(decay), bool(warmup)
        super().__init__(device=device, use_buffers=True, multi_avg_fn=self._average)

    @torch.no_grad()
    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor],
                 num_averaged: torch.Tensor) -> None:
        # AveragedModel calls this once per (device, dtype) group of tensors, in place
        if not averaged[0].is_floating_point():  # counters (BatchNorm's num_batches_tracked): follow the model
            torch._foreach_copy_(averaged, current)
            return
        weight = 1.0 - decay_at(self.decay, int(num_averaged), self.warmup)
        torch._foreach_lerp_(averaged, current, weight)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Lightning's version reloads the raw weights whenever the averaged model exists, which after a
        # fit would make trainer.test(ckpt_path="best") test the raw weights: only restore them to resume.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
