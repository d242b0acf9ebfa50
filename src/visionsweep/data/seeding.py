"""Per-sample augmentation seeds, and the DataLoader that draws them: what sample ``i`` gets in an epoch
depends on (epoch seed, i) alone.

Without this, each DataLoader worker draws from its own copy of the pipeline's generators, so the
augmentation a sample gets depends on which worker loads it: changing ``data.num_workers`` (or the batch
size) changes the random streams, and results are only reproducible on machines with the same setting.
Here the loader draws one epoch seed from torch's global generator (so ``seed_everything`` fixes it) and
every sample reseeds the pipeline from ``(epoch seed, index)`` first: ~7 us per sample, against ~90 us for
albumentations' own ``set_random_seed``, by pointing every transform at one shared pair of generators
whose state is set directly.

Nothing here needs saving for a resume: the epoch seed comes from torch's global generator, whose state
every checkpoint stores (:mod:`visionsweep.callbacks.checkpoint`), and the per-sample seeds follow from it.

:class:`SeededDataLoader` (the loader of both data modules) draws the dataset's epoch seed each epoch,
before any index reaches a worker, and takes the same count of numbers from the generator whether its
workers are fresh or persistent, which is what a resumed run needs to shuffle and augment like the
uninterrupted one. :class:`NoSingleBatchSampler` leaves out a training batch of one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, get_worker_info

_MASK64 = (1 << 64) - 1
_INC = 0xDA3E39CB94B95BDB_D7C6C3C0E8F8E2C9 | 1  # any odd PCG64 increment; fixed, so streams are fixed


def _mix(x: int) -> int:
    """splitmix64: a well-spread 64-bit value from any integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _transforms(pipeline: Any) -> list:
    """``pipeline`` and every transform nested in it (Compose, OneOf, SomeOf ...)."""
    out, todo = [], [pipeline]
    while todo:
        t = todo.pop()
        out.append(t)
        todo.extend(getattr(t, "transforms", None) or [])
    return out


def seed_sample(seeder: SampleSeeder, pipeline: Any, index: int) -> None:
    """Seed ``pipeline`` for sample ``index``: from the epoch seed when the loader set one, else (a plain
    DataLoader) reseed a worker's pickled copy once per worker, so workers at least draw differently."""
    if not hasattr(pipeline, "set_random_seed"):
        return
    if seeder.active:
        seeder.seed(pipeline, index)
        return
    info = get_worker_info()  # None in the main process: the pipeline keeps its own seeded stream
    if info is not None and getattr(pipeline, "_visionsweep_worker_seed", None) != info.seed:
        # each worker holds a pickled copy with identical generator state: without this, all workers (and
        # all epochs, with fresh workers) draw the same parameters. info.seed differs per worker and epoch.
        pipeline.set_random_seed(info.seed % 2**32)
        pipeline._visionsweep_worker_seed = info.seed


class SampleSeeder:
    """Reseeds an albumentations pipeline per sample from a shared epoch seed.

    The epoch seed lives in a one-element shared tensor created in the main process by the first
    :meth:`start_epoch` (the loader calls it before starting its workers), so the workers, forked or
    spawned, see every update made before an epoch's indices are sent.
    """

    def __init__(self) -> None:
        self.epoch_seed: torch.Tensor | None = None  # made by the first start_epoch (before workers start)
        self._np: np.random.Generator | None = None
        self._py: random.Random | None = None

    def __getstate__(self) -> dict:  # generators are per process
        return {"epoch_seed": self.epoch_seed, "_np": None, "_py": None}

    def start_epoch(self, generator: torch.Generator | None = None) -> int:
        """Draw this epoch's seed from ``generator`` (None: torch's global generator) and publish it."""
        seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())  # >= 0
        if self.epoch_seed is None:
            self.epoch_seed = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.epoch_seed[0] = seed
        return seed

    @property
    def active(self) -> bool:
        """Whether an epoch seed was published (else the caller keeps its own seeding)."""
        return self.epoch_seed is not None

    def seed(self, pipeline: Any, index: int) -> None:
        """Make ``pipeline``'s next call draw from ``(epoch seed, index)``."""
        if self._np is None:
            self._np, self._py = np.random.Generator(np.random.PCG64(0)), random.Random(0)
        if getattr(pipeline, "random_generator", None) is not self._np:  # first call, or someone reseeded it
            for t in _transforms(pipeline):
                if hasattr(t, "random_generator"):
                    t.random_generator, t.py_random = self._np, self._py
        a = _mix(int(self.epoch_seed[0]) ^ _mix(index))
        b = _mix(a)
        self._py.seed(a)
        bits = self._np.bit_generator
        bits.state = {"bit_generator": "PCG64", "state": {"state": (a << 64) | b, "inc": _INC},
                      "has_uint32": 0, "uinteger": 0}


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
