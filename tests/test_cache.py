"""Decoded-sample cache: round trip equals fresh decode + resize, invalidation, concurrent fills."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionsweep.data.cache import DiskCache, MemoryCache, ResizeRule, decode_entry, resize_short_side
from visionsweep.data.images import load_rgb
from visionsweep.errors import ConfigError


def _photo(seed: int, w: int = 160, h: int = 120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], axis=2)
    return np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 6 images: JPEGs 160x120, one portrait JPEG, one RGBA PNG, one small PNG."""
    root = tmp_path_factory.mktemp("cache_data")
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(5):
            Image.fromarray(_photo(10 * c + i)).save(root / f"c{c}" / f"{i}.jpg", quality=90)
    Image.fromarray(_photo(99, 90, 150)).save(root / "c0" / "portrait.jpg")
    rgba = np.dstack([_photo(98), np.full((120, 160), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "c1" / "alpha.png")
    Image.fromarray(_photo(97, 40, 30)).save(root / "c2" / "small.png")
    return root


def _files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.*"))


def test_cached_samples_equal_fresh_decode_and_resize(folder, tmp_path):
    rule = ResizeRule(short_side=64, interpolation="bicubic")
    files = _files(folder)
    memory, disk = MemoryCache(rule, files, threads=2), DiskCache(tmp_path, rule)
    assert disk.fill(files, threads=2) == len(files)  # first fill decodes everything
    again = DiskCache(tmp_path, rule)
    for path in files:
        fresh = resize_short_side(load_rgb(path), 64, "bicubic")
        assert fresh.dtype == np.uint8 and min(fresh.shape[:2]) == min(64, *load_rgb(path).shape[:2])
        np.testing.assert_array_equal(memory.get(path), fresh)
        np.testing.assert_array_equal(again.get(path), fresh)
    assert again.hits == len(files) and again.misses == 0  # served from disk, nothing decoded
    assert (tmp_path / rule.key() / "info.json").is_file()
    # a different rule is a different cache folder
    assert ResizeRule(72, "bicubic").key() != rule.key() != ResizeRule(64, "bilinear").key()


def test_changed_file_invalidates_its_entry(folder, tmp_path):
    rule = ResizeRule(short_side=48)
    path = tmp_path / "img.jpg"
    Image.fromarray(_photo(1)).save(path)
    cache = DiskCache(tmp_path / "cache", rule)
    first = cache.get(path)
    np.testing.assert_array_equal(cache.get(path), first)
    assert (cache.hits, cache.misses) == (1, 1)
    Image.fromarray(_photo(2)[::-1]).save(path)  # new content; make sure the mtime moves too
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = cache.get(path)
    assert cache.misses == 2, "a changed file must be decoded again"
    np.testing.assert_array_equal(second, rule.decode(path))
    assert not np.array_equal(second, first)
    # a corrupted entry is detected and replaced, never served
    cache.entry(path).write_bytes(b"garbage")
    np.testing.assert_array_equal(cache.get(path), rule.decode(path))
    misses = cache.misses
    assert cache.prune([path]) == 1  # the stale first entry is removed ...
    assert sorted(cache.dir.glob("*/*.u8")) == [cache.entry(path)]  # ... the current one is kept
    np.testing.assert_array_equal(cache.get(path), rule.decode(path))
    assert cache.misses == misses  # and served from disk: nothing decoded again


def _fill(cache_dir: str, files: list[str], start) -> None:
    start.wait()
    DiskCache(cache_dir, ResizeRule(short_side=40)).fill(files, threads=2)


def test_two_processes_filling_the_same_cache_do_not_corrupt_it(folder, tmp_path):
    files = [str(p) for p in _files(folder)] * 3  # the same entries written over and over
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_fill, args=(str(tmp_path), files, start)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rule = ResizeRule(short_side=40)
    cache = DiskCache(tmp_path, rule)
    for path in _files(folder):
        np.testing.assert_array_equal(decode_entry(cache.entry(path).read_bytes()), rule.decode(path))
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"
    assert len(list(tmp_path.rglob("*.u8"))) == len(_files(folder))


def test_reduced_jpeg_decode_is_smaller_but_close(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(_photo(5, 640, 480)).save(path, quality=95)
    full = load_rgb(path)
    small = load_rgb(path, min_short_side=100)  # 480 // 4 = 120 >= 100: decoded at 1/4 scale
    assert full.shape == (480, 640, 3) and small.shape == (120, 160, 3) and small.dtype == np.uint8
    ref = resize_short_side(full, 120, "area")
    assert np.abs(small.astype(int) - ref.astype(int)).mean() < 6
    assert load_rgb(path, min_short_side=300).shape == full.shape  # less than 2x larger: full decode
    # EXIF orientation still honoured at reduced scale
    img = Image.fromarray(_photo(6, 640, 480))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg", min_short_side=100).shape == (160, 120, 3)


def test_datamodule_cache_modes_give_uint8_and_identical_eval(folder, tmp_path):
    from visionsweep.augment import build_pipelines
    from visionsweep.data.folder import FolderDataModule

    batches = {}
    for mode in ("none", "memory", "disk"):
        train_tf, eval_tf = build_pipelines({"name": "t", "train": [
            {"_target_": "albumentations.RandomResizedCrop", "size": [32, 32]}]}, 32, 0.875, "bilinear", seed=0)
        dm = FolderDataModule(str(folder), image_size=32, crop_pct=0.875, interpolation="bilinear",
                              val_fraction=0.3, batch_size=8, num_workers=0, cache=mode,
                              cache_dir=str(tmp_path / "c"), train_transform=train_tf, eval_transform=eval_tf)
        x, _ = next(iter(dm.train_dataloader()))
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
        batches[mode] = torch.cat([x for x, _ in dm.val_dataloader()])
        if mode == "disk":
            assert dm.resize_rule("train").short_side == 37 and dm.resize_rule("val").short_side == 37
            assert "images" in dm.prefill_cache(progress=False)
            assert (tmp_path / "c" / dm.resize_rule("train").key()).is_dir()
    # eval samples are cached at the eval pipeline's own short side: evaluation is unchanged by the cache
    assert torch.equal(batches["memory"], batches["none"]) and torch.equal(batches["disk"], batches["none"])


def test_bad_cache_settings_name_the_key(folder):
    from visionsweep.data.folder import FolderDataModule

    with pytest.raises(ConfigError, match="data.cache=ram"):
        FolderDataModule(str(folder), image_size=32, cache="ram")
    with pytest.raises(ConfigError, match="data.image_size"):
        FolderDataModule(str(folder), cache="memory")
    with pytest.raises(ConfigError, match="data.num_workers=many"):
        FolderDataModule(str(folder), num_workers="many")
    assert FolderDataModule(str(folder), num_workers="auto").num_workers >= 1


def test_memory_cache_views_are_read_only_and_a_writing_transform_gets_a_copy(folder):
    from visionsweep.data.dataset import ImageFolderDataset

    paths = _files(folder)[:3]
    cache = MemoryCache(ResizeRule(short_side=40), paths)
    view = cache.get(paths[0])
    assert not view.flags.writeable  # no copy per sample; nobody can scribble on the shared buffer
    before = cache.buffer.copy()

    def invert_in_place(image):
        image[...] = 255 - image  # raises on a read-only view
        return {"image": image}

    ds = ImageFolderDataset([(p, 0) for p in paths], invert_in_place, cache=cache)
    x, _ = ds[0]
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), 255 - view)
    np.testing.assert_array_equal(cache.buffer, before)  # the cache is untouched
    x, _ = ImageFolderDataset([(p, 0) for p in paths], None, cache=cache)[1]  # no transform: still a tensor
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), cache.get(paths[1]))


def test_the_cache_command_fills_the_disk_cache_of_a_training_config(folder, tmp_path, capsys):
    import subprocess
    import sys

    from visionsweep.cache import main

    cache_dir = tmp_path / "c"
    main(["data=folder", f"data.root={folder}", "data.image_size=32", f"data.cache_dir={cache_dir}"])
    out = capsys.readouterr().out
    assert "cache ready:" in out and "15 images, 15 decoded" in out and "3 images, 3 decoded" in out
    assert list(cache_dir.glob("*/info.json"))  # data.cache=none in the config: the disk cache is filled
    with pytest.raises(SystemExit) as stop:
        main(["data=folder", "data.root=/no/such/dir"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("error: data root '/no/such/dir' does not exist") \
        and "\n" not in err, err
    # the old spelling still works (a thin alias of the same main), with the same one-line errors
    old = subprocess.run([sys.executable, "-m", "visionsweep.data.cache", "data=folder", "model=resnt18"],
                         capture_output=True, text=True, timeout=120)
    last = old.stderr.strip().splitlines()[-1]
    assert old.returncode == 2 and last.startswith("error: bad override 'model=resnt18': no such model (did you "
                                                   "mean resnet18"), old.stderr
