"""LightningModules around timm backbones, and the pixel normalisation they all start with.

``ClassifierModule`` is imported on first use (PEP 562), so that ``visionsweep.models.<light module>``
does not pull in Lightning.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

__all__ = ["ClassifierModule", "PixelNormalize"]


def _import_timm_without_wandb() -> None:
    """Import timm with ``wandb`` hidden, unless either is imported already.

    timm imports wandb when it is installed (``timm.utils.summary``, for timm's own train script): 237 modules
    and ~0.5 s in every job, though no job of ours reaches that code. A ``None`` in ``sys.modules`` makes
    that ``import wandb`` fail (timm catches the ImportError); the entry is removed again, so a run with
    ``logger=wandb`` imports wandb as usual.
    """
    if "timm" in sys.modules or "wandb" in sys.modules:
        return
    sys.modules["wandb"] = None  # type: ignore[assignment]
    try:
        import timm  # noqa: F401
    finally:
        if sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]


_import_timm_without_wandb()  # the models are timm backbones (smp's encoders too): whoever imports one imports timm


def __getattr__(name: str) -> Any:
    if name == "ClassifierModule":
        from visionsweep.models.classifier import ClassifierModule

        return ClassifierModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PixelNormalize(nn.Module):
    """``(x / 255 - mean) / std`` as one multiply-add (``x * scale + shift``) on whatever device ``x`` is.

    Batches travel as uint8 (4x less host-to-device traffic than float, no CPU float math); this module
    is the one place they become normalised floats, for training, evaluation and exported models alike.

    Args:
        mean: Per-channel mean of 0..1 pixels (the backbone's timm data config).
        std: Per-channel standard deviation.
        memory_format: Layout of the output (``torch.channels_last`` / ``torch.contiguous_format``);
            None keeps the input's.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 memory_format: torch.memory_format | None = None) -> None:
        super().__init__()
        std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)  # not in checkpoints
        self.register_buffer("shift", -mean_t / std_t, persistent=False)
        self.memory_format = memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0..255) ``N x C x H x W``, any layout → normalised float32."""
        x = x.float() if self.memory_format is None else x.to(torch.float32, memory_format=self.memory_format)
        return x * self.scale + self.shift
