"""Folder image data sets as a Lightning data module (scan, check, split, load).

Batches are uint8 ``B x 3 x H x W`` tensors (see :mod:`visionsweep.data.dataset`); the model
normalises on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from visionsweep.data import scan
from visionsweep.data.base import SplitDataModule
from visionsweep.data.builtin import BUILTIN, ensure_builtin
from visionsweep.data.cache import (
    CACHE_DIRNAME,
    DiskCache,
    MemoryCache,
    ResizeRule,
    check_mode,
    eval_short_side,
    train_short_side,
)
from visionsweep.data.dataset import ImageFolderDataset, collate_images
from visionsweep.data.scan import SplitRow, csv_path
from visionsweep.data.splits import (SPLITS, Sample, check_balance, check_class_subset, check_fold, check_holdouts,
                                     check_train_per_class, class_counts, count_lines, imbalance, keep_per_class,
                                     kfold_split, loss_weights, select_classes, stratified_split, weighted_sampler)
from visionsweep.errors import ConfigError, DataError
from visionsweep.utils.checks import flag, number, whole

log = logging.getLogger(__name__)

class FolderDataModule(SplitDataModule):
    """Image classification data from a folder (``root/<class>/<image>``) or a built-in set.

    Args:
        root: Data folder (``data.root``).
        builtin: Built-in set written to ``root`` first (``"digits"`` or ``"shapes"``), or None.
        image_size: The model's input side (the transforms passed in already use it); also sets the
            cache's and the reduced decoder's target sizes.
        crop_pct: Eval centre-crop fraction (eval short side = ``image_size / crop_pct``).
        interpolation: Resize interpolation (also used when caching).
        val_fraction: Validation share per class for the seeded split.
        test_fraction: Test share per class for the seeded split.
        split_seed: Seed of the split (independent of the training seed).
        split_dir: Folder with ``train.csv``/``val.csv``/``test.csv`` to re-use instead of splitting.
        folds: k-fold cross-validation: K folds of the non-test images (null: the plain split);
            see :mod:`visionsweep.data.splits`.
        fold: The validation fold (0..K-1) of this job; sweep it: ``data.fold=0,1,2``.
        classes: Class folder names to use (e.g. ``[7, 8, 9]``); the others are ignored. None: all.
        train_per_class: Keep this many training images per class (drawn with ``split_seed``, so the
            same images whatever the model seed); val and test are unchanged. None: all.
        batch_size: Batch size of every loader.
        num_workers: DataLoader worker processes, or ``"auto"``: the cores this process may use
            (fastest, but the augmentation random streams then depend on the machine).
        pin_memory: Pin host memory; None means "if CUDA is available".
        persistent_workers: Keep workers alive between epochs (only when ``num_workers > 0``).
        skip_bad_images: Skip unreadable files (recorded in ``bad_images``) instead of failing.
        verify_images: Check every file with :func:`check_image` during setup.
        output_dir: Where to write ``splits/*.csv`` and ``bad_images.txt``; None writes nothing.
        train_transform: Training augmentation, ``t(image=hwc_uint8)["image"]``.
        eval_transform: Evaluation transform (val/test/predict).
        cache: Decoded-sample cache: ``none``, ``memory`` (decode everything once when the first
            loader is built, shared with the workers) or ``disk`` (one file per image, filled during the first
            epoch, re-used by later runs and sweep jobs); see :mod:`visionsweep.data.cache`.
        cache_dir: Disk cache root; None: ``<root>/.visionsweep_cache``.
        cache_scale: Training samples are cached with short side ``image_size * cache_scale`` (room for
            random crops); val/test at the eval short side (so evaluation is unchanged by the cache).
        decode_reduce: Decode JPEGs much larger than needed at 1/2, 1/4 or 1/8 scale inside the decoder.
        prefetch_factor: Batches each worker loads ahead (None: PyTorch's default, 2).
        balance: Imbalanced classes: ``none``, ``weights`` (inverse-frequency loss weights, :meth:`loss_weights`)
            or ``sampler`` (a seeded weighted sampler draws the training samples); see :mod:`visionsweep.data.splits`.
        multilabel: Must stay false: a class folder gives one label per image (``data=table`` reads several).
    """

    csv_header = ("path", "label", "class")
    csv_path_columns = ("path",)

    def __init__(
        self,
        root: str,
        *,
        builtin: str | None = None,
        image_size: int | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        split_dir: str | None = None,
        folds: int | None = None,
        fold: int = 0,
        classes: list[str | int] | None = None,
        train_per_class: int | None = None,
        batch_size: int = 64,
        num_workers: int | str = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        skip_bad_images: bool = False,
        verify_images: bool = True,
        output_dir: str | None = None,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
        cache: str | None = "none",
        cache_dir: str | None = None,
        cache_scale: float = 1.15,
        decode_reduce: bool = False,
        prefetch_factor: int | None = None,
        balance: str = "none",
        multilabel: bool = False,
    ) -> None:
        super().__init__(root=root, builtin=builtin, image_size=image_size, crop_pct=crop_pct,
                         interpolation=interpolation, val_fraction=val_fraction, test_fraction=test_fraction,
                         split_seed=split_seed, split_dir=split_dir, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, persistent_workers=persistent_workers, output_dir=output_dir,
                         train_transform=train_transform, eval_transform=eval_transform)
        if builtin and builtin not in BUILTIN:
            raise ConfigError(f"unknown data.builtin '{builtin}': choose from {', '.join(sorted(BUILTIN))}")
        self.cache_mode = check_mode(cache)
        if self.cache_mode != "none" and not image_size:
            raise ConfigError("data.cache needs data.image_size (the training script fills it from the backbone)")
        cache_scale = number(cache_scale, "data.cache_scale", 1.0, 4.0, 1.15)
        if prefetch_factor is not None:
            prefetch_factor = whole(prefetch_factor, "data.prefetch_factor", 1, 64, 2, also=" or null")
        self.kfold = check_fold(folds, fold)  # (K, k) or None
        self.class_subset = check_class_subset(classes)
        self.train_per_class = check_train_per_class(train_per_class)
        self.skip_bad_images = flag(skip_bad_images, "data.skip_bad_images")
        self.verify_images = flag(verify_images, "data.verify_images")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.root / CACHE_DIRNAME
        self.cache_scale, self.decode_reduce = cache_scale, flag(decode_reduce, "data.decode_reduce")
        self.prefetch_factor = prefetch_factor
        self.balance = check_balance(balance)
        if flag(multilabel, "data.multilabel"):
            raise ConfigError("task=multilabel needs several labels per image, which class folders cannot give: "
                              "use data=table data.file=<labels.csv> (see the README's multi-label section)")
        self.multilabel = False  # samples are (path, class index); the table module may say otherwise
        self._caches: dict[str, Any] = {}

    def prepare_data(self) -> None:
        """Write the built-in data set to ``root`` if one is configured (once, atomically)."""
        if self.builtin:
            ensure_builtin(self.builtin, self.root)

    # ------------------------------------------------------------------ finding the samples
    def _from_split_files(self, rows: dict[str, list[SplitRow]]) -> tuple[list[str], dict[str, list[Sample]]]:
        """``(path, label)`` of ``path,label,class`` rows; the classes are the sorted names in ``train.csv``."""
        labelled: dict[str, list[tuple[str, int, str, Path]]] = {s: [] for s in SPLITS}
        for split in SPLITS:
            for csv_file, line, row in rows[split]:
                try:
                    label = int(row["label"])
                except (TypeError, ValueError):
                    raise DataError(f"'{csv_file}' line {line}: label '{row['label']}' is not an integer") from None
                labelled[split].append((row["path"], label, row["class"], csv_file))
        classes = sorted({cls for _, _, cls, _ in labelled["train"]})
        index = {c: i for i, c in enumerate(classes)}
        splits: dict[str, list[Sample]] = {s: [] for s in SPLITS}
        for split in SPLITS:
            for rel, label, cls, csv_file in labelled[split]:
                if cls not in index:
                    raise DataError(f"class '{cls}' in '{csv_file}' does not occur in train.csv: "
                                    "fix or regenerate the split")
                if index[cls] != label:
                    raise DataError(f"'{csv_file}': label {label} for class '{cls}' disagrees with train.csv "
                                    f"(expected {index[cls]}): regenerate the split")
                path = self.root / rel
                if not path.is_file():
                    raise DataError(f"file '{path}' listed in '{csv_file}' does not exist: "
                                    "fix data.root or data.split_dir")
                splits[split].append((path, label))
        return classes, self._drop_bad(splits)

    def _from_split_folders(self, folders: dict[str, Path]) -> tuple[list[str], dict[str, list[Sample]]]:
        if self.kfold:
            raise ConfigError(f"data.folds={self.kfold[0]}: '{self.root}' is already split into "
                              f"{'/'.join(folders)} folders; k-fold needs one folder per class")
        train, ignored = scan.scan_classes(folders["train"])
        classes = sorted(train)
        scan.require_two_classes(classes, folders["train"])
        index = {c: i for i, c in enumerate(classes)}
        per_split: dict[str, dict[str, list[Path]]] = {"train": train}
        for split in ("val", "test"):
            if split not in folders:
                continue
            found, n_ignored = scan.scan_classes(folders[split], allow_empty=True)
            ignored += n_ignored
            for cls in found:
                if cls not in index:
                    raise DataError(
                        f"class folder '{folders[split] / cls}' has no counterpart in "
                        f"'{folders['train']}': every {split} class needs training images"
                    )
            per_split[split] = found
        self.ignored_files = ignored
        splits = {
            s: [(p, index[c]) for c in sorted(per_split.get(s, {})) for p in per_split[s][c]]
            for s in SPLITS
        }
        return classes, self._drop_bad(splits)

    def _seeded_split(self) -> tuple[list[str], dict[str, list[Sample]]]:
        per_class, self.ignored_files = scan.scan_classes(self.root)
        if self.class_subset:  # before the split (and the image check): other folders play no part
            select_classes(sorted(per_class), {}, self.class_subset, self.root)  # raises for an unknown name
            per_class = {c: per_class[c] for c in self.class_subset}
        scan.require_two_classes(list(per_class), self.root)
        per_class = self._drop_bad_per_class(per_class)
        if self.kfold:
            splits = kfold_split(per_class, *self.kfold, self.test_fraction, self.split_seed)
        else:
            splits = stratified_split(per_class, self.val_fraction, self.test_fraction, self.split_seed)
        check_holdouts({c: len(f) for c, f in per_class.items()}, splits, self.val_fraction, self.test_fraction)
        return sorted(per_class), splits

    def _finish(self, classes: list[str], splits: dict[str, list[Sample]],
                source: str) -> tuple[list[str], dict[str, list[Sample]]]:
        root = self.root
        if self.class_subset and source != "seeded":
            classes, splits = select_classes(classes, splits, self.class_subset,
                                             self.split_dir if source == "split_dir" else root)
        scan.require_two_classes(classes, root)
        if self.train_per_class:
            splits = {**splits, "train": keep_per_class(splits["train"], self.train_per_class, self.split_seed,
                                                        classes)}
        if not splits["train"]:
            raise DataError(f"no training images found under '{root}': check data.root / data.split_dir")
        if not splits["val"] and source != "seeded":  # seeded: check_holdouts said it with the counts
            where = f"'{self.split_dir / 'val.csv'}'" if source == "split_dir" else f"the val folder of '{root}'"
            raise DataError(f"{where} holds no images: validation needs at least one (add images, or use a "
                            "seeded split: a root of class folders)")
        return classes, splits

    def _check(self, paths: list[Path]) -> dict[Path, str]:
        """Find bad files; raise unless skipping, else record them in ``bad_images``."""
        if not self.verify_images:
            return {}
        bad = scan.find_bad_images(paths)
        if not self.skip_bad_images:
            scan.raise_for_bad(bad)
        self.bad_images.extend(sorted(bad.items()))
        return bad

    def _drop_bad(self, splits: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
        bad = self._check([p for s in SPLITS for p, _ in splits[s]])
        return {s: [(p, y) for p, y in splits[s] if p not in bad] for s in SPLITS}

    def _drop_bad_per_class(self, per_class: dict[str, list[Path]]) -> dict[str, list[Path]]:
        bad = self._check([p for files in per_class.values() for p in files])
        kept = {c: [p for p in files if p not in bad] for c, files in per_class.items()}
        for cls, files in kept.items():
            if not files:
                raise DataError(
                    f"class folder '{self.root / cls}' has no readable images (all skipped as bad): "
                    "replace them or remove the folder"
                )
        return kept

    # ------------------------------------------------------------------ what a sample is
    def _csv_row(self, sample: Sample) -> tuple[str, int, str]:
        path, label = sample
        return csv_path(path, self.root), label, self._classes[label]

    def _files(self, sample: Sample) -> tuple[Path]:
        return (sample[0],)

    def _split_how(self) -> str:
        how = super()._split_how()
        if self.kfold and self._split_source == "seeded":
            how = f"fold {self.kfold[1]} of {self.kfold[0]}, split seed {self.split_seed}"
        if self.train_per_class:
            how += f", {self.train_per_class} train images per class"
        return how

    def _classes_note(self) -> str:
        return f" ({', '.join(self.class_subset)})" if self.class_subset else ""

    # ------------------------------------------------------------------ class balance
    def class_count_lines(self) -> list[str]:
        """One line per split with its count of each class (positives per class for multi-label)."""
        return count_lines(self.classes, self._state(), self.multilabel)

    def class_counts(self) -> dict[str, dict[str, int]]:
        """``split → class → count`` (positives per class for multi-label): run.json's ``data.class_counts``."""
        return {split: dict(zip(self.classes, class_counts([y for _, y in samples], self.num_classes)))
                for split, samples in self._state().items() if samples}

    def train_imbalance(self) -> float:
        """Largest / smallest class count of the training split."""
        return imbalance(class_counts([y for _, y in self.train_samples], self.num_classes))

    def loss_weights(self) -> list[float] | None:
        """Per-class loss weights with ``data.balance=weights`` (else None), from the training split."""
        if self.balance != "weights":
            return None
        return loss_weights([y for _, y in self.train_samples], self.num_classes)

    # ------------------------------------------------------------------ loaders
    def resize_rule(self, split: str) -> ResizeRule | None:
        """How ``split``'s samples are cached / decoded; None without an ``image_size``.

        Training: short side ``image_size * cache_scale`` (at least the eval short side); val/test:
        exactly the eval short side ``image_size / crop_pct``, so the eval resize becomes a no-op.
        """
        if not self.image_size:
            return None
        size, crop = int(self.image_size), float(self.crop_pct or 1.0)
        short = (train_short_side(size, crop, self.cache_scale) if split == "train"
                 else eval_short_side(size, crop))
        return ResizeRule(short, str(self.interpolation or "bilinear").lower(), self.decode_reduce)

    def _cache_for(self, split: str) -> Any:
        """The cache serving ``split`` (built, and for ``memory`` filled, on first use)."""
        if self.cache_mode == "none":
            return None
        rule = self.resize_rule(split)
        assert rule is not None
        if rule.key() not in self._caches:
            if self.cache_mode == "disk":
                self._caches[rule.key()] = DiskCache(self.cache_dir, rule)
            else:  # every split with this rule at once: val and test share the eval rule
                paths = [p for s in SPLITS if self.resize_rule(s) == rule for p, _ in self._state()[s]]
                cache = MemoryCache(rule, paths)
                log.info("memory cache: %d images, %.1f MB (short side %d)", len(paths), cache.nbytes / 1e6,
                         rule.short_side)
                self._caches[rule.key()] = cache
        return self._caches[rule.key()]

    def prefill_cache(self, progress: bool = True, threads: int | None = None) -> str:
        """Fill the cache of every split now (``make cache``); a no-op for ``data.cache=none``.

        Args:
            progress: Show a progress bar per rule.
            threads: Decoding threads (None: the cores this process may use).

        Returns:
            A one-line summary, e.g. ``"disk cache .../s258-ab12: 1200 images, 1200 decoded"``.
        """
        if self.cache_mode == "none":
            return "data.cache=none: nothing to fill"
        lines = []
        for rule in {self.resize_rule(s) for s in SPLITS if self._state()[s]}:
            paths = [p for s in SPLITS if self.resize_rule(s) == rule for p, _ in self._state()[s]]
            if self.cache_mode == "memory":
                cache = self._caches.get(rule.key()) or MemoryCache(rule, paths, threads, progress)
                self._caches[rule.key()] = cache
                lines.append(f"memory, short side {rule.short_side}: {len(paths)} images, {cache.nbytes / 1e6:.1f} MB")
            else:
                disk = DiskCache(self.cache_dir, rule)
                n = disk.fill(paths, threads, progress, fingerprint=self.fingerprint())
                lines.append(f"{disk.dir}: {len(paths)} images, {n} decoded")
        return "; ".join(sorted(lines))

    def _dataset(self, split: str, transform: Callable | None) -> ImageFolderDataset:
        rule = self.resize_rule(split)
        return ImageFolderDataset(
            self._state()[split], transform, cache=self._cache_for(split),
            decode_short_side=rule.short_side if rule is not None and self.decode_reduce else None)

    def _loader_options(self, split: str, transform: Callable | None) -> dict[str, Any]:
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 and self.prefetch_factor else {}
        if split == "train" and self.balance == "sampler":
            extra["sampler"] = weighted_sampler([y for _, y in self.train_samples], self.num_classes)
        return {"collate_fn": collate_images, **extra}  # one copy per sample into a channels-last batch
