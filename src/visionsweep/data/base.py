"""What every visionsweep data module shares: lazily set-up splits, their accessors and loaders.

Subclasses fill ``_splits`` / ``_classes`` / ``_split_source`` in ``setup()`` and implement
``_loader(split, transform, shuffle)`` and ``eval_pipeline()``; train.py, eval.py and the report
only use what this class defines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from visionsweep.errors import ConfigError, DataError

log = logging.getLogger("visionsweep.data")


def resolve_workers(num_workers: int | str) -> int:
    """``data.num_workers`` as a count: ``"auto"`` = the cores this process may use.

    Raises:
        ConfigError: Not an integer >= 0 or ``auto``.
    """
    if isinstance(num_workers, str) and num_workers.lower() == "auto":
        from visionsweep.parallel import node_cores

        return node_cores()
    try:
        workers = int(num_workers)
    except (TypeError, ValueError):
        raise ConfigError(f"data.num_workers={num_workers}: give an integer >= 0 or auto") from None
    if workers < 0:
        raise ConfigError(f"data.num_workers={num_workers} must be >= 0")
    return workers


class SplitDataModule(pl.LightningDataModule):
    """Base of the folder (classification) and segmentation data modules."""

    _splits: dict[str, list[Any]] | None = None
    _classes: list[str]
    _split_source: str = ""
    train_transform: Callable | None = None
    eval_transform: Callable | None = None

    def _state(self) -> dict[str, list[Any]]:
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

    def eval_pipeline(self) -> Callable | None:
        """The val/test/predict transform."""
        return self.eval_transform

    def _loader(self, split: str, transform: Callable | None, shuffle: bool) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader (``train_transform``); a last batch of one image is left out.

        Raises:
            DataError: The training split has fewer than 2 samples (BatchNorm needs 2 per batch).
        """
        n, batch = len(self.train_samples), int(getattr(self, "batch_size", 0) or 0)
        if n < 2:
            raise DataError(f"the training split has {n} sample(s): training needs at least 2 "
                            "(BatchNorm cannot learn from one); add images or lower data.val_fraction / "
                            "data.test_fraction")
        if batch > 1 and n % batch == 1 and not getattr(self, "_said_single", False):
            self._said_single = True  # once: Lightning asks for the loader more than once
            log.info("train: %d samples in batches of %d: the last batch would hold 1 sample, which "
                     "BatchNorm cannot train on, so it is left out each epoch (a different one each "
                     "time, the order is shuffled)", n, batch)
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
