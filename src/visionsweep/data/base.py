"""What every visionsweep data module shares: the set-up skeleton, the splits, their files and the loaders.

:meth:`SplitDataModule.setup` runs the same steps for every task: write the built-in set, check the
root, choose the split (``data.split_dir`` files, ``train/ val/ [test/]`` folders, else a seeded
split), finish it (subsets, checks), and write ``<run>/splits/*.csv``. A subclass says how to find its
samples (``(path, label)`` or ``(image, mask)`` pairs) in each of those three places, what a split-file
row holds, and how to build a dataset; train.py, eval.py and the report only use what this class defines.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from visionsweep.data import scan
from visionsweep.data.seeding import SeededDataLoader
from visionsweep.data.scan import (
    SplitRow,
    read_split_files,
    relative_posix,
    write_split_files,
)
from visionsweep.data.splits import SPLITS, validate_fractions
from visionsweep.errors import ConfigError, DataError
from visionsweep.parallel import node_cores
from visionsweep.utils.atomic import atomic_write
from visionsweep.utils.checks import check_image_size, flag, whole

log = logging.getLogger("visionsweep.data")
Splits = dict[str, list[Any]]


def resolve_workers(num_workers: int | str) -> int:
    """``data.num_workers`` as a count: ``"auto"`` = the cores this process may use.

    Raises:
        ConfigError: Not an integer >= 0 or ``auto``.
    """
    if isinstance(num_workers, str) and num_workers.lower() == "auto":
        return node_cores()
    # each worker is a process holding a copy of the data set: far more than the cores only waits and
    # exhausts memory (100000 workers spent minutes starting, then failed with a traceback)
    most = max(64, 8 * node_cores())
    return whole(num_workers, "data.num_workers", 0, most, "auto", also=" or auto (one per core)")


def fingerprint_files(paths: Iterable[Path], root: Path) -> dict[str, Any]:
    """Identify the exact files a run used (cheap: one ``stat`` per file, contents not read).

    Args:
        paths: Every file of every split (images, and masks for segmentation).
        root: The data root the fingerprint's paths are relative to.

    Returns:
        ``{"n_files": int, "sha256": hex digest of the sorted (relative path, size) list}``.

    Raises:
        DataError: A file that disappeared or cannot be read since the scan.
    """
    from visionsweep.data.images import bad_image_message

    entries = []
    for path in paths:
        try:
            entries.append((relative_posix(path, root), path.stat().st_size))
        except FileNotFoundError:
            raise DataError(f"image '{path}' disappeared after the data set was scanned: restore it or re-run") from None
        except OSError as e:  # a symlink loop with data.verify_images=false, ...
            raise DataError(bad_image_message(path, f"{type(e).__name__}: {e.strerror or e}")) from None
    digest = hashlib.sha256("".join(f"{rel}\t{size}\n" for rel, size in sorted(entries)).encode())
    return {"n_files": len(entries), "sha256": digest.hexdigest()}


class SplitDataModule(pl.LightningDataModule):
    """Base of the folder (classification) and segmentation data modules.

    Args:
        root: Data folder (``data.root``).
        builtin: Built-in set written to ``root`` first (see the subclass), or None.
        image_size: The model's input side (the transforms passed in already use it).
        crop_pct: Eval centre-crop fraction.
        interpolation: Resize interpolation.
        val_fraction: Validation share of the seeded split.
        test_fraction: Test share of the seeded split.
        split_seed: Seed of the split (independent of the training seed).
        split_dir: Folder with ``train.csv``/``val.csv``[/``test.csv``] to re-use instead of splitting.
        batch_size: The global batch of every loader: under DDP each rank loads ``batch_size / world
            size`` (:attr:`rank_batch_size`), so the steps and the result do not depend on the ranks.
        num_workers: DataLoader worker processes, or ``"auto"``: the cores this process may use.
        pin_memory: Pin host memory; None means "if CUDA is available".
        persistent_workers: Keep workers alive between epochs (only when ``num_workers > 0``).
        output_dir: Where to write ``splits/*.csv`` and ``bad_images.txt``; None writes nothing.
        train_transform: Training augmentation.
        eval_transform: Evaluation transform (val/test/predict).
    """

    #: split-file columns, and those of them holding paths (relative to ``root``)
    csv_header: tuple[str, ...] = ()
    csv_path_columns: tuple[str, ...] = ()
    #: the DataLoader class of every loader (its per-epoch seeds keep augmentation worker-independent)
    loader_class: type[DataLoader] = SeededDataLoader
    #: whether a root holding ``train/ val/ [test/]`` folders is split by them (a table of labels says its own split)
    split_folders: bool = True

    def __init__(
        self, root: str | os.PathLike = ".", *, builtin: str | None = None, image_size: int | None = None,
        crop_pct: float | None = None, interpolation: str | None = None, val_fraction: float = 0.2,
        test_fraction: float = 0.0, split_seed: int = 0, split_dir: str | None = None, batch_size: int = 32,
        num_workers: int | str = 0, pin_memory: bool | None = None, persistent_workers: bool = True,
        output_dir: str | None = None, train_transform: Callable | None = None, eval_transform: Callable | None = None,
    ) -> None:
        super().__init__()
        validate_fractions(val_fraction, test_fraction)
        batch_size = whole(batch_size, "data.batch_size", 1, None, 32)
        split_seed = whole(split_seed, "data.split_seed", 0, 2**32 - 1, 0)  # numpy's seed range
        if isinstance(image_size, int) and not isinstance(image_size, bool):
            check_image_size(image_size, batch_size)
        if image_size is not None and not isinstance(image_size, int):  # e.g. auto: resolved for a backbone first
            raise ConfigError(f"data.image_size={image_size}: the data module needs a side in pixels (visionsweep "
                              "resolves auto for the backbone: builders.resolve_inputs)")
        self.num_workers = resolve_workers(num_workers)
        self.root = Path(os.fspath(root)).expanduser()
        self.builtin = builtin
        self.image_size, self.crop_pct, self.interpolation = image_size, crop_pct, interpolation
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed = int(split_seed)
        self.split_dir = Path(split_dir).expanduser() if split_dir else None
        self.batch_size = int(batch_size)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else flag(pin_memory, "data.pin_memory")
        self.persistent_workers = flag(persistent_workers, "data.persistent_workers")
        self.output_dir = Path(output_dir).expanduser() if output_dir else None
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.bad_images: list[tuple[Path, str]] = []  # (path, reason) of files skipped as unreadable
        self.ignored_files = 0  # files in the data folders that are not samples (notes.txt ...)
        self._splits: Splits | None = None
        self._classes: list[str] = []
        self._split_source = ""

    # ------------------------------------------------------------------ what a subclass says
    def _from_split_files(self, rows: dict[str, list[SplitRow]]) -> tuple[list[str] | None, Splits]:
        """Samples (and classes, when the files say them) of the rows of ``data.split_dir``'s files."""
        raise NotImplementedError

    def _from_split_folders(self, folders: dict[str, Path]) -> tuple[list[str] | None, Splits]:
        """Samples (and classes) of a root split into ``train/ val/ [test/]`` folders."""
        raise NotImplementedError

    def _seeded_split(self) -> tuple[list[str] | None, Splits]:
        """Samples (and classes) of ``root``, split with ``split_seed``."""
        raise NotImplementedError

    def _finish(self, classes: list[str] | None, splits: Splits, source: str) -> tuple[list[str], Splits]:
        """The final classes and splits (subsets, checks) of what ``source`` gave."""
        raise NotImplementedError

    def _csv_row(self, sample: Any) -> Sequence:
        """``sample`` as a row of its split file (columns :attr:`csv_header`)."""
        raise NotImplementedError

    def _files(self, sample: Any) -> Sequence[Path]:
        """The files ``sample`` is read from (fingerprinted)."""
        raise NotImplementedError

    def _dataset(self, split: str, transform: Callable | None) -> Dataset:
        """The dataset of ``split`` with ``transform``."""
        raise NotImplementedError

    def _loader_options(self, split: str, transform: Callable | None) -> dict[str, Any]:
        """Extra keyword arguments of :attr:`loader_class` (collate, sampler ...)."""
        return {}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Find, check and split the samples (only the first successful call does work).

        Args:
            stage: Lightning stage; ignored, every split is prepared at once.

        Raises:
            DataError: Bad layout, split files or samples (the message names the file and the fix).
        """
        if self._splits is not None:
            return
        self.bad_images, self.ignored_files = [], 0  # a failed earlier attempt may have left entries
        self.prepare_data()  # idempotent; lets setup() alone work outside a Trainer
        scan.check_root(self.root)
        if self.split_dir is not None:
            rows = read_split_files(self.split_dir, self.csv_header, self.csv_path_columns)
            (classes, splits), source = self._from_split_files(rows), "split_dir"
        elif self.split_folders and (folders := scan.find_split_folders(self.root)) is not None:
            (classes, splits), source = self._from_split_folders(folders), "folders"
        else:
            (classes, splits), source = self._seeded_split(), "seeded"
        classes, splits = self._finish(classes, splits, source)
        self._classes, self._splits, self._split_source = list(classes), splits, source
        self._write_outputs()

    def _write_outputs(self) -> None:
        if self.output_dir is None:
            return
        splits = self._state()
        write_split_files(self.output_dir / "splits", self.csv_header,
                          {s: [self._csv_row(x) for x in splits[s]] for s in SPLITS})
        if self.bad_images:
            lines = "".join(f"{path}\t{reason}\n" for path, reason in self.bad_images)
            atomic_write(self.output_dir / "bad_images.txt", lines.encode("utf-8"))

    # ------------------------------------------------------------------ results
    def _state(self) -> Splits:
        if self._splits is None:
            self.setup()
        assert self._splits is not None
        return self._splits

    @property
    def classes(self) -> list[str]:
        """Class names in label order (``classes[i]`` is label ``i``); runs ``setup()`` if needed."""
        self._state()
        return self._classes

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def train_samples(self) -> list[Any]:
        """Samples of the training split (``(path, label)`` or ``(image, mask)`` pairs)."""
        return self._state()["train"]

    @property
    def val_samples(self) -> list[Any]:
        """Samples of the validation split."""
        return self._state()["val"]

    @property
    def test_samples(self) -> list[Any]:
        """Samples of the test split (may be empty)."""
        return self._state()["test"]

    @property
    def has_test(self) -> bool:
        """Whether a non-empty test split exists (else ``test_dataloader`` serves val)."""
        return bool(self.test_samples)

    @property
    def split_source(self) -> str:
        """Where the split came from: ``"folders"``, ``"seeded"`` or ``"split_dir"``."""
        self._state()
        return self._split_source

    def fingerprint(self) -> dict[str, Any]:
        """``{"n_files", "sha256"}`` over the sorted (relative path, size) of every file used."""
        splits = self._state()
        return fingerprint_files((p for s in SPLITS for x in splits[s] for p in self._files(x)), self.root)

    def describe(self) -> str:
        """One-line summary of the data.

        Returns:
            E.g. ``"digits: 10 classes, 1437 train / 180 val / 180 test (seeded split, seed 0)"``.
        """
        splits = self._state()
        name = self.builtin or self.root.name or str(self.root)
        counts = " / ".join(f"{len(splits[s])} {s}" for s in SPLITS if s != "test" or splits[s])
        bad = f", {len(self.bad_images)} bad images skipped" if self.bad_images else ""
        return (f"{name}: {self.num_classes} classes{self._classes_note()}, {counts} ({self._split_how()})"
                f"{bad}{self._data_note()}")

    def _split_how(self) -> str:
        return {"seeded": f"seeded split, seed {self.split_seed}", "folders": "split folders",
                "split_dir": f"split from {self.split_dir}"}[self._split_source]

    def _classes_note(self) -> str:
        return ""

    def _data_note(self) -> str:
        return ""

    # ------------------------------------------------------------------ loaders
    @property
    def world_size(self) -> int:
        """Training processes of the attached trainer (1 outside a Trainer or on one device)."""
        return max(1, int(getattr(self.trainer, "world_size", 1) or 1))

    @property
    def rank_batch_size(self) -> int:
        """The batch of each process's loaders: ``batch_size`` (the global batch) / :attr:`world_size`.

        Raises:
            ConfigError: ``batch_size`` does not divide among the processes (one line naming values that do).
        """
        if self.world_size <= 1:
            return self.batch_size
        from visionsweep.distributed import rank_batch_size

        trainer = self.trainer
        nodes = max(1, int(getattr(trainer, "num_nodes", 1) or 1))
        return rank_batch_size(self.batch_size, self.world_size // nodes, nodes)

    def eval_pipeline(self) -> Callable | None:
        """The val/test/predict transform."""
        return self.eval_transform

    def _loader(self, split: str, transform: Callable | None, shuffle: bool) -> DataLoader:
        workers = self.num_workers
        return self.loader_class(
            self._dataset(split, transform), batch_size=self.rank_batch_size, shuffle=shuffle, num_workers=workers,
            pin_memory=self.pin_memory, persistent_workers=self.persistent_workers and workers > 0,
            **self._loader_options(split, transform))

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader (``train_transform``); a last batch of one image is left out.

        Under DDP each rank's loader takes its share of the batch (:attr:`rank_batch_size`) and the
        distributed sampler gives it ``ceil(n / world size)`` samples: as many steps as one process.

        Raises:
            DataError: The training split has fewer than 2 samples (BatchNorm needs 2 per batch).
            ConfigError: ``batch_size`` does not divide among the processes.
        """
        n, world = len(self.train_samples), self.world_size
        if n < 2:
            raise DataError(f"the training split has {n} sample(s): training needs at least 2 "
                            "(BatchNorm cannot learn from one); add images or lower data.val_fraction / "
                            "data.test_fraction")
        batch = self.rank_batch_size
        said = getattr(self, "_said", set())  # once each: Lightning asks for the loader more than once
        self._said = said
        if world > 1 and world not in said:
            said.add(world)
            log.info("data.batch_size=%d is the global batch: %d per process x %d processes, %d training "
                     "samples a process", self.batch_size, batch, world, -(-n // world))
        n_rank = -(-n // world)  # the distributed sampler pads the shards to equal length
        if batch > 1 and n_rank % batch == 1 and "single" not in said:
            said.add("single")
            log.info("train: %d samples%s in batches of %d: the last batch would hold 1 sample, which "
                     "BatchNorm cannot train on, so it is left out each epoch (a different one each "
                     "time, the order is shuffled)", n_rank, " a process" if world > 1 else "", batch)
        return self._loader("train", self.train_transform, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation loader (:meth:`eval_pipeline`)."""
        return self._loader("val", self.eval_pipeline(), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test loader, or the validation loader when there is no test split (see ``has_test``)."""
        return self._loader("test" if self.has_test else "val", self.eval_pipeline(), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Same as :meth:`test_dataloader`."""
        return self.test_dataloader()
