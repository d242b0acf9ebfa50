"""Slot transport: batches through reused shared-memory slots equal ordinary DataLoader batches."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from visionsweep.data.dataset import _to_chw_uint8, collate_images
from visionsweep.data.transport import SlotBatch, SlotDataLoader, SlotPool


class _Images(Dataset):
    """Deterministic uint8 HWC images (value pattern depends on the index), returned as CHW views."""

    def __init__(self, n: int = 23, size: int = 6) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)
        return _to_chw_uint8(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8), f"{i}"), i % 4


def _expected(ds: Dataset, batch_size: int) -> list:
    return list(DataLoader(ds, batch_size=batch_size, collate_fn=collate_images))


def _assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (x, y), (wx, wy) in zip(got, want):
        assert x.dtype == torch.uint8 and x.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x, wx, rtol=0, atol=0)
        assert y.tolist() == wy.tolist() and y.dtype == torch.int64


def test_slot_loader_gives_the_ordinary_batches_and_kept_batches_stay_intact():
    ds = _Images()
    loader = SlotDataLoader(ds, sample_shape=(3, 6, 6), batch_size=4, num_workers=2, persistent_workers=True,
                            prefetch_factor=2)
    want = _expected(ds, 4)
    for _ in range(3):  # every batch of every epoch held until the end: slot reuse must not touch them
        _assert_same(list(loader), want)
    pool = loader.collate_fn.pool
    assert pool.taken >= len(want) * 2  # most batches came through the slots
    assert not pool.busy.any()  # every slot handed back


def test_slot_loader_survives_an_abandoned_epoch():
    ds = _Images()
    loader = SlotDataLoader(ds, sample_shape=(3, 6, 6), batch_size=4, num_workers=2, persistent_workers=True)
    want = _expected(ds, 4)
    for i, _ in enumerate(loader):  # stop early: prefetched batches are dropped by the next epoch
        if i == 1:
            break
    _assert_same(list(loader), want)
    _assert_same(list(loader), want)
    assert not loader.collate_fn.pool.busy.any()


def test_batches_that_do_not_fit_a_slot_take_the_ordinary_path():
    ds = _Images(n=8, size=6)  # full batches only: 4 x 6 x 6 x 3 bytes > a 4 x 4 x 4 x 3 slot
    loader = SlotDataLoader(ds, sample_shape=(3, 4, 4), batch_size=4, num_workers=1, persistent_workers=True)
    _assert_same(list(loader), _expected(ds, 4))
    assert loader.collate_fn.pool.taken == 0
    # without persistent workers or workers at all: the plain collate
    assert SlotDataLoader(ds, sample_shape=(3, 6, 6), batch_size=4, num_workers=1).collate_fn is collate_images
    assert SlotDataLoader(ds, sample_shape=(3, 6, 6), batch_size=4).collate_fn is collate_images


def test_a_dropped_untaken_slot_batch_frees_its_slot_but_the_worker_copy_does_not():
    pool = SlotPool(num_workers=1, slots_per_worker=2, slot_bytes=64)
    slot = pool.acquire(0, 48)
    assert slot == 0 and pool.busy.tolist() == [1, 0]
    sent = SlotBatch(pool.id, slot, (1, 4, 4, 3), [1], generation=0)
    received = pickle.loads(pickle.dumps(sent))  # what the main process gets
    del sent  # the worker's copy: the slot is still in use
    assert pool.busy.tolist() == [1, 0]
    del received
    assert pool.busy.tolist() == [0, 0]
    assert pool.acquire(0, 65) is None  # too big for a slot


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_pin_memory_thread_takes_slot_batches():  # pragma: no cover - GPU machines only
    ds = _Images()
    loader = SlotDataLoader(ds, sample_shape=(3, 6, 6), batch_size=4, num_workers=2, persistent_workers=True,
                            pin_memory=True)
    got = list(loader)
    assert all(x.is_pinned() for x, _ in got)
    _assert_same(got, _expected(ds, 4))
    assert loader.collate_fn.pool.taken > 0 and not loader.collate_fn.pool.busy.any()


def test_the_pin_memory_thread_dispatch_takes_a_slot_batch(monkeypatch):
    """What the pin-memory thread does with a worker's SlotBatch (CPU stand-in for pinning)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
    pool = SlotPool(num_workers=1, slots_per_worker=2, slot_bytes=2 * 4 * 4 * 3)
    slot = pool.acquire(0, 2 * 4 * 4 * 3)
    hwc = torch.arange(2 * 4 * 4 * 3, dtype=torch.uint8).view(2, 4, 4, 3)
    pool.view(slot, (2, 4, 4, 3)).copy_(hwc)
    received = pickle.loads(pickle.dumps(SlotBatch(pool.id, slot, (2, 4, 4, 3), [3, 1], generation=0)))
    images, labels = pin_memory(received)
    assert not pool.busy.any() and pool.taken == 1
    torch.testing.assert_close(images, hwc.permute(0, 3, 1, 2), rtol=0, atol=0)
    assert labels.tolist() == [3, 1]
    pool.view(slot, (2, 4, 4, 3)).zero_()  # the slot is reused: the taken batch is a copy
    assert images.sum() > 0


def test_lightning_can_rebuild_the_loader_with_another_sampler():
    """What Lightning does for DDP (DistributedSampler) or overfit_batches: re-instantiate with a new sampler."""
    from pytorch_lightning.utilities.data import _update_dataloader
    from torch.utils.data import SequentialSampler

    ds = _Images()
    loader = SlotDataLoader(ds, sample_shape=(3, 6, 6), batch_size=4, num_workers=1, persistent_workers=True,
                            shuffle=True)
    rebuilt = _update_dataloader(loader, SequentialSampler(ds))
    assert type(rebuilt) is SlotDataLoader and rebuilt.sample_shape == (3, 6, 6)
    assert rebuilt.collate_fn.pool is not loader.collate_fn.pool  # its own slots
    _assert_same(list(rebuilt), _expected(ds, 4))
    assert rebuilt.collate_fn.pool.taken > 0


def _augmented(samples: list, workers: int, batch_size: int, epochs: int = 2) -> list[torch.Tensor]:
    import albumentations as A

    from visionsweep.data.dataset import ImageFolderDataset

    pipeline = A.Compose([A.RandomCrop(6, 6), A.HorizontalFlip(), A.OneOf([A.RandomBrightnessContrast(p=1),
                                                                          A.ToGray(p=1)])], seed=1)
    loader = SlotDataLoader(ImageFolderDataset(samples, pipeline), sample_shape=(3, 6, 6), batch_size=batch_size,
                            num_workers=workers, persistent_workers=workers > 0)
    torch.manual_seed(0)
    return [torch.cat([x for x, _ in loader]) for _ in range(epochs)]


def test_augmentation_depends_on_seed_epoch_and_index_only_not_on_workers_or_batch_size(tmp_path):
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    samples = []
    for i in range(7):  # the same picture 7 times: only the augmentation tells them apart
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        samples.append((tmp_path / f"{i}.png", 0))
    reference = _augmented(samples, workers=0, batch_size=2)
    for workers, batch_size in ((1, 3), (2, 2), (2, 4)):
        got = _augmented(samples, workers, batch_size)
        for epoch in range(2):
            torch.testing.assert_close(got[epoch], reference[epoch], rtol=0, atol=0,
                                       msg=f"workers={workers} batch={batch_size} epoch={epoch}")
    assert not torch.equal(reference[0], reference[1])  # a new epoch draws new augmentations
    assert len({x.numpy().tobytes() for x in reference[0]}) >= 5  # and the samples of one epoch differ


def test_a_batch_from_before_a_reset_never_frees_the_slot_again():
    """An old iterator outliving its workers' teardown must not free a slot a new worker has filled."""
    pool = SlotPool(num_workers=1, slots_per_worker=1, slot_bytes=48)
    old = pickle.loads(pickle.dumps(SlotBatch(pool.id, pool.acquire(0, 48), (1, 4, 4, 3), [0], generation=0)))
    pool.reset()  # new workers start
    assert pool.acquire(0, 48) == 0  # a new batch fills the slot
    del old
    assert pool.busy.tolist() == [1]  # still the new batch's
    assert pool.acquire(0, 48) is None and pool.acquire(5, 48) is None  # full; unknown worker id


def test_a_failing_collate_frees_its_slot(monkeypatch):
    from visionsweep.data import transport

    monkeypatch.setattr(transport, "get_worker_info", lambda: type("Info", (), {"id": 0})())
    pool = SlotPool(num_workers=1, slots_per_worker=2, slot_bytes=2 * 3 * 6 * 6)
    collate = transport.SlotCollate(pool)
    image = torch.zeros(3, 6, 6, dtype=torch.uint8)
    with pytest.raises(TypeError):
        collate([(image, [1, 0]), (image, [0, 1])])  # multi-label targets: not this collate's job
    assert not pool.busy.any()
    assert isinstance(collate([(image, 1), (image, 0)]), SlotBatch)


def test_slots_are_sized_from_a_batch_sampler_too():
    from torch.utils.data import BatchSampler, SequentialSampler

    ds = _Images()
    loader = SlotDataLoader(ds, sample_shape=(3, 6, 6), batch_sampler=BatchSampler(SequentialSampler(ds), 4, False),
                            num_workers=1, persistent_workers=True)
    assert loader.collate_fn.pool.slot_bytes == 4 * 3 * 6 * 6
    _assert_same(list(loader), _expected(ds, 4))
    assert loader.collate_fn.pool.taken > 0


def test_the_seeded_loader_draws_the_same_numbers_with_fresh_or_persistent_workers():
    """A resumed run starts fresh workers where the uninterrupted one reused them: same generator after."""
    from visionsweep.data.loader import SeededDataLoader

    def state_after_two_epochs(persistent: bool) -> torch.Tensor:
        loader = SeededDataLoader(_Images(n=6), batch_size=3, shuffle=True, num_workers=1,
                                  persistent_workers=persistent, collate_fn=collate_images)
        torch.manual_seed(0)
        for _ in range(2):
            list(loader)
        return torch.get_rng_state()

    assert torch.equal(state_after_two_epochs(True), state_after_two_epochs(False))
