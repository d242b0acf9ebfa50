"""Pixel normalisation inside the model: uint8 batches in, ``(x / 255 - mean) / std`` out, on the device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


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
