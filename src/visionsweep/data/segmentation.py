"""Segmentation data: ``images/`` + ``masks/`` folders (same stems), checked, split and loaded jointly.

Layouts: ``root/images/*`` + ``root/masks/<stem>.png`` (seeded split), or the same pair of folders
under ``root/train``, ``root/val`` (``valid``, ``validation``) and optionally ``root/test``. Masks hold
class indices (one channel: mode L or P; ``ignore_index`` marks pixels to skip) or, for two classes,
0/255. Class names come from ``data.classes``, else ``root/classes.yaml`` (a list, or index: name).
Batches are ``(uint8 B x 3 x H x W, int64 B x H x W)``; images of different sizes in one batch are
padded (masks with ``ignore_index``), and the model pads to its stride and crops back.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from visionsweep.data.base import SplitDataModule
from visionsweep.data.builtin import SEG_BUILTIN, is_complete
from visionsweep.data.dataset import _to_chw_uint8
from visionsweep.data.images import load_rgb
from visionsweep.data.seeding import SampleSeeder, seed_sample
from visionsweep.data.seg_files import (  # noqa: F401 - re-exported
    Pair, _check_pair, _refuse_gaps, builtin_mismatch, find_pairs, load_class_names, read_mask,
)
from visionsweep.data.scan import SplitRow, csv_path
from visionsweep.data.splits import SPLITS, partition
from visionsweep.errors import ConfigError, DataError

log = logging.getLogger(__name__)
MASK_MODES = ("auto", "index", "binary")
EVAL_RESIZE = ("short_side", "none", "crop")


class SegmentationDataset(Dataset):
    """``(image, mask)`` pairs decoded, transformed jointly and returned as tensors.

    Args:
        pairs: ``(image path, mask path)`` pairs.
        transform: Albumentations Compose called as ``t(image=hwc_uint8, mask=hw_uint8)``; None: as is.
        binary: Map every non-zero mask value to 1 (foreground).
    """

    def __init__(self, pairs: Sequence[Pair], transform: Callable | None = None, binary: bool = False) -> None:
        self.pairs, self.transform, self.binary = list(pairs), transform, binary
        self.seeder = SampleSeeder()

    def start_epoch(self, generator: torch.Generator | None = None) -> None:
        """Seed this epoch's augmentation per sample (see :mod:`visionsweep.data.seeding`)."""
        self.seeder.start_epoch(generator)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image, mask = load_rgb(image_path), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise DataError(f"mask '{mask_path}' is {mask.shape[1]}x{mask.shape[0]} but image '{image_path}' "
                            f"is {image.shape[1]}x{image.shape[0]}: masks must match their image pixel for pixel")
        if self.binary:
            mask = (mask > 0).astype(np.uint8)
        if self.transform is not None:
            seed_sample(self.seeder, self.transform, index)
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        mask = np.asarray(mask).astype(np.int64)  # a copy: decoded arrays are read-only
        return _to_chw_uint8(image, image_path), torch.from_numpy(mask)


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]], ignore_index: int) -> tuple[torch.Tensor, ...]:
    """Stack a batch, padding images (0) and masks (``ignore_index``) bottom/right to the largest size."""
    h = max(x.shape[-2] for x, _ in batch)
    w = max(x.shape[-1] for x, _ in batch)
    images = [F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2])) for x, _ in batch]
    masks = [F.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2]), value=ignore_index) for _, m in batch]
    return torch.stack(images), torch.stack(masks)


class SegmentationDataModule(SplitDataModule):
    """Semantic segmentation data from an ``images/`` + ``masks/`` folder or the built-in ``shapes_seg``.

    Args:
        root: Data folder (``data.root``).
        builtin: Built-in set written to ``root`` first (``"shapes_seg"``), or None.
        builtin_options: Keyword arguments of the built-in writer (``n_images``, ``size``...).
        image_size: Training crop side (the train pipeline already uses it) and eval short side.
        crop_pct: Stored only.
        interpolation: Image interpolation of the eval resize (masks always use nearest).
        classes: Class names in index order; None reads ``root/classes.yaml``, else 0..max value.
        mask_mode: ``index`` (values are class indices), ``binary`` (non-zero = foreground) or
            ``auto`` (binary when every mask holds only 0 and 255).
        ignore_index: Mask value that is not a class (skipped by loss and metrics; also the padding).
        eval_resize: ``short_side`` (resize to ``image_size``, no crop), ``none`` (full size) or
            ``crop`` (the classifier's resize + centre crop).
        val_fraction: Validation share of the seeded split.
        test_fraction: Test share of the seeded split.
        split_seed: Seed of the split.
        split_dir: Folder with ``train.csv``/``val.csv``[/``test.csv``] (``image,mask``) to re-use.
        batch_size: Batch size of every loader.
        num_workers: DataLoader worker processes, or ``"auto"``: the cores this process may use.
        pin_memory: Pin host memory; None means "if CUDA is available".
        persistent_workers: Keep workers alive between epochs (only when ``num_workers > 0``).
        verify_masks: Read every mask once in ``setup`` (sizes, values, mode) to fail early and clearly.
        output_dir: Where ``splits/*.csv`` go; None writes nothing.
        train_transform: Training pipeline (albumentations Compose, applied to image and mask).
        eval_transform: The classifier-style eval pipeline, used with ``eval_resize=crop``.
    """

    csv_header = csv_path_columns = ("image", "mask")

    def __init__(
        self, root: str | None, *, builtin: str | None = None, builtin_options: dict | None = None,
        image_size: int | None = None, crop_pct: float | None = None, interpolation: str | None = None,
        classes: Sequence[str] | None = None, mask_mode: str = "auto", ignore_index: int = 255,
        eval_resize: str = "short_side", val_fraction: float = 0.2, test_fraction: float = 0.0,
        split_seed: int = 0, split_dir: str | None = None, batch_size: int = 8, num_workers: int | str = 2,
        pin_memory: bool | None = None, persistent_workers: bool = True, verify_masks: bool = True,
        output_dir: str | None = None, train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
    ) -> None:
        if not root:
            raise ConfigError("data.root is required: data.root=/path/to/folder with images/ and masks/")
        super().__init__(root=root, builtin=builtin, image_size=image_size, crop_pct=crop_pct,
                         interpolation=interpolation, val_fraction=val_fraction, test_fraction=test_fraction,
                         split_seed=split_seed, split_dir=split_dir, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, persistent_workers=persistent_workers, output_dir=output_dir,
                         train_transform=train_transform, eval_transform=eval_transform)
        for key, value, allowed in (("builtin", builtin, (None, *SEG_BUILTIN)), ("mask_mode", mask_mode, MASK_MODES),
                                    ("eval_resize", eval_resize, EVAL_RESIZE)):
            if value not in allowed:
                raise ConfigError(f"data.{key}={value}: choose from {', '.join(str(a) for a in allowed if a)}")
        self.builtin_options = dict(builtin_options or {})
        self.class_names_cfg = list(classes) if classes else None
        self.mask_mode, self.ignore_index, self.eval_resize = mask_mode, int(ignore_index), eval_resize
        self.verify_masks = bool(verify_masks)  # masks are never skipped: a bad one is an error
        self.binary = mask_mode == "binary"

    def prepare_data(self) -> None:
        """Write the built-in set to ``root`` if one is configured (once, atomically).

        A set drawn by an older generator (its ``.complete`` marker says) is moved aside and written
        anew, so an improved generator never trains on stale data silently; one written with other
        options is kept (a warning names it).
        """
        if not self.builtin:
            return
        differs = builtin_mismatch(self.root, self.builtin, self.builtin_options) if is_complete(self.root) else None
        if differs == "options":
            log.warning("'%s' was written with other data.builtin_options than %s: using it as it is (delete "
                        "the folder to write it with these)", self.root, self.builtin_options)
        elif differs == "version":
            log.warning("'%s' holds %s from an older generator: writing it anew", self.root, self.builtin)
            old = self.root.with_name(f".{self.root.name}.stale-{os.getpid()}")
            try:
                os.replace(self.root, old)
            except OSError:  # another process moved it first
                pass
            shutil.rmtree(old, ignore_errors=True)
        if not is_complete(self.root):
            SEG_BUILTIN[self.builtin](self.root, **self.builtin_options)

    # ------------------------------------------------------------------ finding the pairs
    def _from_split_files(self, rows: dict[str, list[SplitRow]]) -> tuple[None, dict[str, list[Pair]]]:
        out: dict[str, list[Pair]] = {s: [] for s in SPLITS}
        for split in SPLITS:
            for csv_file, _, row in rows[split]:
                pair = (self.root / row["image"], self.root / row["mask"])
                if not (pair[0].is_file() and pair[1].is_file()):
                    raise DataError(f"'{csv_file}' lists '{row['image']}' / '{row['mask']}' which do not exist "
                                    "under data.root: fix data.root or data.split_dir")
                out[split].append(pair)
        return None, out

    def _from_split_folders(self, folders: dict[str, Path]) -> tuple[None, dict[str, list[Pair]]]:
        return None, {s: find_pairs(folders[s]) if s in folders else [] for s in SPLITS}

    def _seeded_split(self) -> tuple[None, dict[str, list[Pair]]]:
        pairs = find_pairs(self.root)
        splits = partition(pairs, self.val_fraction, self.test_fraction, np.random.default_rng(self.split_seed))
        if self.test_fraction > 0 and not splits["test"]:
            raise DataError(f"data.test_fraction={self.test_fraction:g} but '{self.root}' has only {len(pairs)} pairs: "
                            "the split needs at least 3 to give one to test; add images or set data.test_fraction=0")
        return None, splits

    def _finish(self, classes: None, splits: dict[str, list[Pair]],
                source: str) -> tuple[list[str], dict[str, list[Pair]]]:
        """Refuse an empty train or val split; the classes come from the config, classes.yaml or the masks."""
        if not splits["train"] or not splits["val"]:
            raise DataError(f"'{self.root}' gives {len(splits['train'])} train / {len(splits['val'])} val pairs: "
                            "both need at least one (add images or lower data.val_fraction)")
        return self._resolve_classes(splits), splits

    def _resolve_classes(self, splits: dict[str, list[Pair]]) -> list[str]:
        names = self.class_names_cfg or load_class_names(self.root)
        if not self.verify_masks:
            if names is None and self.mask_mode != "binary":
                raise ConfigError("data.verify_masks=false needs the class names: data.classes or classes.yaml")
            return names or ["background", "foreground"]
        pairs = [p for s in SPLITS for p in splits[s]]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            values = list(pool.map(_check_pair, pairs, chunksize=16))
        seen = set().union(*values)
        if self.mask_mode == "auto":
            self.binary = seen <= {0, 255} and 255 in seen and (names is None or len(names) == 2)
        if self.binary:
            return names or ["background", "foreground"]
        n = len(names) if names else max([v for v in seen if v != self.ignore_index] + [1]) + 1
        if names is None:
            _refuse_gaps(pairs, values, seen, self.ignore_index)
        for (_, mask), vals in zip(pairs, values):
            bad = sorted(v for v in vals if v >= n and v != self.ignore_index)
            if bad:
                raise DataError(f"mask '{mask}' has values {bad[:5]} outside 0..{n - 1} ({n} classes) that are not "
                                f"data.ignore_index={self.ignore_index}: fix the mask, list every class in "
                                "classes.yaml / data.classes, or set data.ignore_index")
        return names or [str(i) for i in range(n)]

    # ------------------------------------------------------------------ what a sample is
    def _csv_row(self, sample: Pair) -> tuple[str, str]:
        return csv_path(sample[0], self.root), csv_path(sample[1], self.root)

    def _files(self, sample: Pair) -> Pair:
        return sample

    def _data_note(self) -> str:
        return ", binary masks" if self.binary else f", index masks, ignore {self.ignore_index}"

    def eval_pipeline(self) -> Callable | None:
        """The val/test/predict transform of ``eval_resize`` (masks always resized with nearest)."""
        if self.eval_resize == "crop":
            return self.eval_transform
        if self.eval_resize == "none" or not self.image_size:
            return None
        import albumentations as A

        from visionsweep.augment import INTERPOLATIONS

        interp = INTERPOLATIONS.get(str(self.interpolation or "bilinear").lower(), 1)
        return A.Compose([A.SmallestMaxSize(max_size=int(self.image_size), interpolation=interp)], seed=0)

    def _dataset(self, split: str, transform: Callable | None) -> SegmentationDataset:
        return SegmentationDataset(self._state()[split], transform, self.binary)

    def _loader_options(self, split: str, transform: Callable | None) -> dict[str, Any]:
        # padded batches vary in size
        return {"collate_fn": functools.partial(pad_collate, ignore_index=self.ignore_index)}
