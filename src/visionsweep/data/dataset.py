"""The torch Dataset over ``(path, label)`` pairs: decode, augment, return uint8 CHW tensors.

Images stay uint8 on the CPU: normalisation to float happens on the device (4x less
host-to-device traffic, no CPU float math).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from visionsweep.data.images import load_rgb
from visionsweep.data.splits import Sample
from visionsweep.errors import ConfigError


def _to_chw_uint8(image: Any, path: Path) -> torch.Tensor:
    """Turn a transform's output (HWC numpy or CHW tensor) into a contiguous uint8 CHW tensor."""
    if isinstance(image, torch.Tensor):
        tensor = image if image.ndim == 3 else image.unsqueeze(0)
    else:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    if tensor.dtype != torch.uint8:
        # Converting here would silently double the transfer size and hide a mis-built pipeline.
        raise ConfigError(
            f"the image transform returned {tensor.dtype} for '{path}', expected uint8: remove "
            "Normalize/ToFloat from the augmentation pipeline (normalisation runs on the device)"
        )
    return tensor.contiguous()


class ImageFolderDataset(Dataset):
    """A list of ``(path, label)`` pairs decoded with :func:`load_rgb` and transformed.

    Args:
        samples: ``(path, label)`` pairs.
        transform: Albumentations-style callable, ``transform(image=hwc_uint8)["image"]``;
            None returns the decoded image unchanged (no resize).
        cache: Decoded-sample cache (:mod:`visionsweep.data.cache`), anything with ``get(path)``
            returning a uint8 HWC array; None decodes every time.
        decode_short_side: Without a cache: let large JPEGs decode at reduced scale as long as the
            short side stays >= this (see :func:`load_rgb`); None decodes at full size.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable | None = None, cache: Any = None,
                 decode_short_side: int | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.cache = cache
        self.decode_short_side = decode_short_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = self.cache.get(path) if self.cache is not None else load_rgb(path, self.decode_short_side)
        if self.transform is not None:
            if hasattr(self.transform, "set_random_seed") and get_worker_info() is not None:
                # Workers hold identical pickled copies of the pipeline's RNG: reseed per worker/epoch.
                from visionsweep.augment import reseed_in_worker

                reseed_in_worker(self.transform)
            image = self.transform(image=image)["image"]
        return _to_chw_uint8(image, path), int(label)
