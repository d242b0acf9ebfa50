"""The torch Dataset over ``(path, label)`` pairs: decode, augment, return uint8 CHW tensors.

Images stay uint8 on the CPU: normalisation to float happens on the device (4x less
host-to-device traffic, no CPU float math). Nor is there a CPU transpose: a sample is a CHW *view* of
the HWC pixels the decoder and albumentations produce, and :func:`collate_images` copies each one once,
contiguously, into an ``N x C x H x W`` batch stored channels-last (``N x H x W x C`` in memory), which
is the layout a channels-last model wants on the device anyway (the model converts otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from visionsweep.data.images import load_rgb
from visionsweep.data.seeding import SampleSeeder, seed_sample
from visionsweep.data.splits import Sample
from visionsweep.errors import ConfigError


def _to_chw_uint8(image: Any, path: Path) -> torch.Tensor:
    """Turn a transform's output (HWC numpy or CHW tensor) into a uint8 CHW tensor.

    HWC arrays become a CHW view of contiguous HWC memory (channels-last strides), not a transposed copy.
    """
    if isinstance(image, torch.Tensor):
        tensor = image if image.ndim == 3 else image.unsqueeze(0)
    else:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if not arr.flags.writeable:  # an untransformed cache view: torch wants memory it may own
            arr = arr.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    if tensor.dtype != torch.uint8:
        # Converting here would silently double the transfer size and hide a mis-built pipeline.
        raise ConfigError(
            f"the image transform returned {tensor.dtype} for '{path}', expected uint8: remove "
            "Normalize/ToFloat from the augmentation pipeline (normalisation runs on the device)"
        )
    return tensor


def label_tensor(labels: Sequence[Any]) -> torch.Tensor:
    """A batch's labels: int64 ``N`` class indices, or float ``N x classes`` for multi-hot (multi-label) tuples."""
    if labels and isinstance(labels[0], (tuple, list)):
        return torch.as_tensor([list(label) for label in labels], dtype=torch.float32)
    return torch.as_tensor([int(label) for label in labels], dtype=torch.int64)


def collate_images(batch: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(uint8 CHW image, label)`` samples into an ``N x C x H x W`` batch in channels-last memory.

    Each sample is copied once, as one contiguous block (the HWC pixels), straight into shared memory when
    running in a DataLoader worker (as ``default_collate`` does); pinning and ``.to(device)`` keep the
    layout. Samples of different sizes fall back to ``default_collate`` (which names the mismatch).

    Args:
        batch: ``(image, label)`` pairs from :class:`ImageFolderDataset`.

    Returns:
        ``(images, labels)``: uint8 ``N x C x H x W`` (channels-last strides) and :func:`label_tensor`.
    """
    images = [img for img, _ in batch]
    first = images[0]
    if any(img.shape != first.shape or img.dtype != first.dtype for img in images):
        return default_collate(batch)
    c, h, w = first.shape
    numel = len(images) * first.numel()
    if get_worker_info() is not None:  # a worker: write the batch directly into shared memory
        out = first.new(first._typed_storage()._new_shared(numel, device=first.device))
    else:
        out = first.new_empty(numel)
    out = out.view(len(images), h, w, c)
    torch.stack([img.permute(1, 2, 0) for img in images], 0, out=out)
    return out.permute(0, 3, 1, 2), label_tensor([label for _, label in batch])


class ImageFolderDataset(Dataset):
    """A list of ``(path, label)`` pairs decoded with :func:`load_rgb` and transformed.

    Args:
        samples: ``(path, label)`` pairs: a class index, or a multi-hot tuple (multi-label).
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
        self.seeder = SampleSeeder()  # SeededDataLoader starts each epoch; a plain DataLoader leaves it idle

    def start_epoch(self, generator: torch.Generator | None = None) -> None:
        """Seed this epoch's augmentation: sample ``i`` then depends on (epoch seed, i), not on the worker.

        Args:
            generator: Where the epoch seed is drawn from (None: torch's global generator).
        """
        self.seeder.start_epoch(generator)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        path, label = self.samples[index]
        image = self.cache.get(path) if self.cache is not None else load_rgb(path, self.decode_short_side)
        if self.transform is not None:
            image = self._transform(image, index)
        return _to_chw_uint8(image, path), label if isinstance(label, tuple) else int(label)

    def _transform(self, image: np.ndarray, index: int) -> Any:
        seed_sample(self.seeder, self.transform, index)
        # The memory cache hands out read-only views; a transform that writes into its input gets a copy
        # (with the same random draws, when seeded per sample).
        try:
            return self.transform(image=image)["image"]
        except Exception as e:
            if image.flags.writeable or not any(word in str(e) for word in ("read-only", "readonly")):
                raise
            if self.seeder.active:
                seed_sample(self.seeder, self.transform, index)
            return self.transform(image=image.copy())["image"]
