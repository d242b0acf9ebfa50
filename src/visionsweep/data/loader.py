"""The DataLoader of both data modules: per-epoch augmentation seeds, and no training batch of one.

Each epoch, before any index reaches a worker, :class:`SeededDataLoader` draws the dataset's epoch seed
(``dataset.start_epoch``, :mod:`visionsweep.data.seeding`), so what a sample gets depends on (seed,
epoch, index) alone, not on the number of workers or the batch size. It also makes every epoch take the
same count of numbers from the generator whether its workers are fresh or persistent, which is what a
resumed run needs to shuffle and augment like the uninterrupted one
(:mod:`visionsweep.callbacks.run_state`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler


class NoSingleBatchSampler(BatchSampler):
    """``BatchSampler`` that leaves out a trailing partial batch of exactly one sample.

    BatchNorm cannot train on one sample when a layer's map is 1 x 1 ("Expected more than 1 value per
    channel when training"), which a last batch of one (161 images in batches of 32) hits after a whole
    epoch. Shuffled, the image left out differs each epoch. Every other batch is as BatchSampler makes it.
    """

    def __iter__(self) -> Iterator[list[int]]:
        pending = None
        for batch in super().__iter__():
            if pending is not None:
                yield pending
            pending = batch
        if pending is not None and (len(pending) != 1 or self.batch_size == 1 or self.drop_last):
            yield pending  # (drop_last: BatchSampler already left out any partial batch)

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else n // self.batch_size + (n % self.batch_size > 1)


class SeededDataLoader(DataLoader):
    """A DataLoader that seeds its dataset's augmentation per epoch (see the module docs).

    A shuffled (training) loader leaves out a last batch of one sample (:class:`NoSingleBatchSampler`):
    BatchNorm cannot train on it.

    Args:
        *args: DataLoader arguments (``dataset`` first).
        drop_single: Leave out a trailing batch of one sample; None: when ``shuffle`` is set.
        **kwargs: DataLoader keyword arguments.
    """

    def __init__(self, *args: Any, drop_single: bool | None = None, **kwargs: Any) -> None:
        if drop_single is None:
            drop_single = bool(kwargs.get("shuffle"))
        if kwargs.get("sampler") is not None:  # a sampler that draws (data.balance=sampler) replaces shuffling
            kwargs.pop("shuffle", None)
        if drop_single and kwargs.get("batch_sampler") is None and kwargs.get("batch_size", 1) is not None:
            dataset = args[0] if args else kwargs["dataset"]
            sampler = kwargs.pop("sampler", None) or (
                RandomSampler(dataset, generator=kwargs.get("generator")) if kwargs.pop("shuffle", False)
                else SequentialSampler(dataset))
            kwargs["batch_sampler"] = NoSingleBatchSampler(sampler, int(kwargs.pop("batch_size", 1)),
                                                           bool(kwargs.pop("drop_last", False)))
        super().__init__(*args, **kwargs)

    def __iter__(self) -> Iterator:
        if hasattr(self.dataset, "start_epoch"):  # before any index of the epoch reaches a worker
            self.dataset.start_epoch(self.generator)
        if self.persistent_workers and self.num_workers > 0 and self._iterator is not None:
            # a fresh iterator draws its workers' base seed from the generator, a reused one does not:
            # draw it anyway, so that every epoch takes the same count of numbers (a resumed run starts
            # with fresh workers where the uninterrupted one reused them, and must shuffle the same)
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return super().__iter__()
