"""Tests of visionsweep.data: decoding, scanning, splitting and error messages.

Built-in sets, fingerprints and loaders: tests/test_data_builtin.py.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionsweep.data import (
    FolderDataModule,
    ImageFolderDataset,
    check_image,
    load_rgb,
    split_counts,
)
from visionsweep.errors import ConfigError, DataError

H, W = 10, 12  # tiny images: height 10, width 12


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _exif_rotated_jpeg(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 degrees clockwise to display
    return _save(path, Image.fromarray(_rgb(7)), exif=exif)


def _mixed_class(folder: Path, seed: int) -> int:
    """Write one image of every supported mode/extension into ``folder``; return the count."""
    rgb = Image.fromarray(_rgb(seed))
    _save(folder / "rgb.png", rgb)
    _save(folder / "upper.JPG", rgb)
    _save(folder / "plain.jpeg", rgb)
    _save(folder / "bitmap.bmp", rgb)
    _save(folder / "web.webp", rgb)
    _save(folder / "gray.png", rgb.convert("L"))
    _save(folder / "alpha.png", rgb.convert("RGBA"))
    _save(folder / "palette.png", rgb.convert("P"))
    _save(folder / "deep.png", Image.fromarray((np.arange(H * W).reshape(H, W) * 500).astype(np.uint16)))
    _exif_rotated_jpeg(folder / "rotated.jpg")
    return 10


def _simple_set(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for c, n in counts.items():
        for i in range(n):
            _save(root / c / f"{i:03d}{ext}", Image.fromarray(_rgb(i)))
    return root


def _dm(root: Path, **kwargs) -> FolderDataModule:
    kwargs.setdefault("num_workers", 0)
    return FolderDataModule(root=str(root), **kwargs)


def _paths(samples) -> list[str]:
    return [p.as_posix() for p, _ in samples]


# ----------------------------------------------------------------------------- decoding
def test_load_rgb_converts_every_mode(tmp_path: Path) -> None:
    base = _rgb(1)
    rgb = Image.fromarray(base)
    cases = {
        "L.png": rgb.convert("L"),
        "LA.png": rgb.convert("LA"),
        "P.png": rgb.convert("P"),
        "1.png": rgb.convert("1"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "I.tif": Image.fromarray(base[:, :, 0].astype(np.int32) * 1000),
        "F.tif": Image.fromarray(base[:, :, 0].astype(np.float32) / 255.0),
        "rgb.tiff": rgb,
    }
    for name, img in cases.items():
        arr = load_rgb(_save(tmp_path / name, img))
        assert arr.dtype == np.uint8 and arr.shape == (H, W, 3), name
        assert arr.flags["C_CONTIGUOUS"]
    # 'I' data is rescaled by its actual max, so the brightest pixel becomes 255 (not clipped).
    arr_i = load_rgb(tmp_path / "I.tif")
    assert arr_i.max() == 255 and len(np.unique(arr_i)) > 50
    np.testing.assert_allclose(load_rgb(tmp_path / "F.tif")[:, :, 0], base[:, :, 0], atol=1)
    np.testing.assert_array_equal(load_rgb(tmp_path / "L.png")[:, :, 0], np.asarray(rgb.convert("L")))


def test_load_rgb_alpha_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[:, : W // 2] = (255, 0, 0, 255)  # opaque red left half, fully transparent right half
    arr = load_rgb(_save(tmp_path / "a.png", Image.fromarray(rgba)))
    assert (arr[:, 0] == (255, 0, 0)).all() and (arr[:, -1] == 255).all()
    pal = Image.fromarray(rgba[:, :, :3]).convert("P")
    pal.info["transparency"] = int(np.asarray(pal)[0, -1])  # the black index becomes transparent
    arr = load_rgb(_save(tmp_path / "p.png", pal, transparency=pal.info["transparency"]))
    assert (arr[:, -1] == 255).all() and (arr[:, 0] == (255, 0, 0)).all()


def test_load_rgb_16_bit_scaled_not_clipped(tmp_path: Path) -> None:
    data = np.full((H, W), 257 * 100, dtype=np.uint16)
    data[0, 0], data[0, 1] = 65535, 0
    img = Image.fromarray(data)
    assert img.mode == "I;16"
    arr = load_rgb(_save(tmp_path / "d.png", img))
    assert arr[0, 0].tolist() == [255] * 3 and arr[0, 1].tolist() == [0] * 3
    assert arr[5, 5].tolist() == [100] * 3
    big_endian = Image.fromarray(data.astype(">u2"))
    assert big_endian.mode == "I;16B"
    from visionsweep.data.images import to_rgb_array

    np.testing.assert_array_equal(to_rgb_array(big_endian), arr)


def test_load_rgb_honours_exif_orientation(tmp_path: Path) -> None:
    arr = load_rgb(_exif_rotated_jpeg(tmp_path / "r.jpg"))
    assert arr.shape == (W, H, 3)  # rotated: height and width swapped


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good_png = tmp_path / "good.png"
    Image.fromarray(_rgb()).save(good_png)
    good_jpg = tmp_path / "good.jpg"
    Image.fromarray(_rgb()).save(good_jpg)
    files = {
        "zero": tmp_path / "zero.png",
        "garbage": tmp_path / "garbage.jpg",
        "png_header": tmp_path / "cut.png",
        "jpg_header": tmp_path / "cut_head.jpg",
        "jpg_tail": tmp_path / "cut_tail.jpg",
    }
    files["zero"].write_bytes(b"")
    files["garbage"].write_bytes(np.random.default_rng(0).bytes(500))
    files["png_header"].write_bytes(good_png.read_bytes()[:40])
    files["jpg_header"].write_bytes(good_jpg.read_bytes()[:200])
    files["jpg_tail"].write_bytes(good_jpg.read_bytes()[:-12])
    return files


def test_check_image_and_load_rgb_reject_bad_files(tmp_path: Path) -> None:
    files = _bad_files(tmp_path)
    assert check_image(tmp_path / "good.png") is None and check_image(tmp_path / "good.jpg") is None
    assert check_image(files["zero"]) == "zero-byte file"
    assert check_image(files["garbage"]).startswith("not an image")
    for key in ("png_header", "jpg_header", "jpg_tail"):
        assert check_image(files[key]) is not None, key
    for key, path in files.items():
        with pytest.raises(DataError) as info:
            load_rgb(path)
        msg = str(info.value)
        assert str(path) in msg and "data.skip_bad_images" in msg and "\n" not in msg, key
    with pytest.raises(DataError, match=r"zero-byte file"):
        load_rgb(files["zero"])


# ----------------------------------------------------------------------------- scanning
def test_mixed_folder_modes_and_extensions(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    n = _mixed_class(root / "cat", 0)
    _mixed_class(root / "dog", 1)
    (root / "cat" / ".DS_Store").write_bytes(b"junk")
    (root / "cat" / "._rgb.png").write_bytes(b"junk")  # macOS resource fork: hidden, skipped
    (root / "cat" / "notes.txt").write_text("not an image")
    _save(root / "dog" / "nested" / "deep.png", Image.fromarray(_rgb()))  # a sub-folder: still "dog"
    dm = _dm(root, val_fraction=0.0)
    dm.setup()
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2
    assert len(dm.train_samples) == 2 * n + 1 and dm.val_samples == [] and not dm.has_test
    assert (root / "dog" / "nested" / "deep.png", 1) in dm.train_samples
    assert dm.ignored_files == 1  # notes.txt
    assert dm.split_source == "seeded"
    names = {p.name for p, _ in dm.train_samples}
    assert {"upper.JPG", "web.webp", "bitmap.bmp", "deep.png", "rotated.jpg"} <= names
    assert not any(name.startswith(".") for name in names)
    ds = ImageFolderDataset(dm.train_samples)
    for i in range(len(ds)):
        x, y = ds[i]
        # a CHW view of the decoder's HWC memory: the collate copies it once, no transpose before
        assert x.dtype == torch.uint8 and x.shape[0] == 3 and x.permute(1, 2, 0).is_contiguous()
        expected = (3, W, H) if dm.train_samples[i][0].name == "rotated.jpg" else (3, H, W)
        assert tuple(x.shape) == expected
        assert y == dm.classes.index(dm.train_samples[i][0].relative_to(root).parts[0])


def test_stratified_seeded_split(tmp_path: Path) -> None:
    root = _simple_set(tmp_path / "set", {"a": 20, "b": 10, "c": 2})
    out = tmp_path / "run1"
    dm = _dm(root, val_fraction=0.2, test_fraction=0.1, split_seed=3, output_dir=str(out))
    dm.setup()
    per_class = {
        split: np.bincount([y for _, y in samples], minlength=3).tolist()
        for split, samples in zip(
            ("train", "val", "test"), (dm.train_samples, dm.val_samples, dm.test_samples)
        )
    }
    assert per_class == {"train": [14, 7, 1], "val": [4, 2, 1], "test": [2, 1, 0]}
    sets = [set(_paths(s)) for s in (dm.train_samples, dm.val_samples, dm.test_samples)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == 32

    again = _dm(root, val_fraction=0.2, test_fraction=0.1, split_seed=3)
    np.random.seed(123), torch.manual_seed(123)  # the global seed must not matter
    again.setup()
    assert _paths(again.val_samples) == _paths(dm.val_samples)
    assert _paths(again.test_samples) == _paths(dm.test_samples)
    other = _dm(root, val_fraction=0.2, test_fraction=0.1, split_seed=4)
    assert _paths(other.val_samples) != _paths(dm.val_samples)

    with (out / "splits" / "val.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "label", "class"]
    assert [r["path"] for r in rows] == [p.relative_to(root).as_posix() for p, _ in dm.val_samples]
    assert {r["class"] for r in rows} == {"a", "b", "c"}
    assert (out / "splits" / "test.csv").exists() and not (out / "bad_images.txt").exists()

    reused = _dm(root, split_dir=str(out / "splits"), split_seed=99, val_fraction=0.5)
    reused.setup()
    assert reused.split_source == "split_dir" and reused.classes == dm.classes
    for split in ("train_samples", "val_samples", "test_samples"):
        assert getattr(reused, split) == getattr(dm, split)
    assert reused.fingerprint() == dm.fingerprint()


def test_split_counts_small_classes() -> None:
    assert split_counts(1, 0.2, 0.0) == (0, 0)
    assert split_counts(2, 0.2, 0.0) == (1, 0)
    assert split_counts(3, 0.2, 0.1) == (1, 1)
    assert split_counts(10, 0.25, 0.0) == (3, 0)  # 2.5 rounds half up
    assert split_counts(5, 0.9, 0.0) == (4, 0)  # at least one training image


def test_split_dir_missing_file_and_csv(tmp_path: Path) -> None:
    root = _simple_set(tmp_path / "set", {"a": 4, "b": 4})
    out = tmp_path / "run"
    _dm(root, output_dir=str(out)).setup()
    assert not (out / "splits" / "test.csv").exists()  # no test split: no file
    victim = root / (out / "splits" / "val.csv").read_text().splitlines()[1].split(",")[0]
    victim.unlink()
    with pytest.raises(DataError, match=str(victim)):
        _dm(root, split_dir=str(out / "splits")).setup()
    (out / "splits" / "train.csv").unlink()
    with pytest.raises(DataError, match="train.csv"):
        _dm(root, split_dir=str(out / "splits")).setup()


def test_split_folders_are_honoured(tmp_path: Path) -> None:
    root = tmp_path / "presplit"
    _simple_set(root / "train", {"x": 3, "y": 4, "z": 2})
    _simple_set(root / "valid", {"x": 1, "y": 2})
    _simple_set(root / "test", {"z": 2})
    dm = _dm(root, val_fraction=0.5, test_fraction=0.3)
    dm.setup()
    assert dm.split_source == "folders" and dm.classes == ["x", "y", "z"]
    assert (len(dm.train_samples), len(dm.val_samples), len(dm.test_samples)) == (9, 3, 2)
    assert all(p.parts[-3] == "valid" for p, _ in dm.val_samples)
    assert {y for _, y in dm.test_samples} == {2} and dm.has_test
    assert "9 train / 3 val / 2 test (split folders)" in dm.describe()

    _simple_set(root / "test", {"unknown": 1})
    with pytest.raises(DataError, match=r"unknown"):
        _dm(root).setup()


# ----------------------------------------------------------------------------- errors
def test_layout_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=f"'{missing}' does not exist.*data.root"):
        _dm(missing).setup()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        _dm(a_file).setup()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"no class sub-folders in '{empty}'"):
        _dm(empty).setup()
    loose = tmp_path / "loose"
    _save(loose / "1.png", Image.fromarray(_rgb()))
    with pytest.raises(DataError, match="1 images lie directly in it"):
        _dm(loose).setup()
    no_images = _simple_set(tmp_path / "noimg", {"a": 2, "b": 2})
    (no_images / "c").mkdir()
    (no_images / "c" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=f"class folder '{no_images / 'c'}' has no images"):
        _dm(no_images).setup()
    single = _simple_set(tmp_path / "single", {"only": 3})
    with pytest.raises(DataError, match="only one class \\('only'\\)"):
        _dm(single).setup()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"val_fraction": 1.0}, "data.val_fraction"), ({"test_fraction": -0.1}, "data.test_fraction"),
     ({"val_fraction": 0.6, "test_fraction": 0.4}, "data.val_fraction")],
)
def test_bad_fractions(tmp_path: Path, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _dm(tmp_path, **kwargs)


def test_bad_images_fail_or_are_skipped(tmp_path: Path) -> None:
    root = _simple_set(tmp_path / "set", {"a": 5, "b": 5})
    zero = root / "a" / "zzz_empty.png"
    zero.write_bytes(b"")
    garbage = root / "b" / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg at all" * 20)
    with pytest.raises(DataError) as info:
        _dm(root).setup()
    msg = str(info.value)
    assert str(zero) in msg and "zero-byte file" in msg and "data.skip_bad_images=true" in msg
    assert "1 more bad files" in msg

    zero.unlink()
    with pytest.raises(DataError, match=f"'{garbage}' \\(not an image"):
        _dm(root).setup()

    zero.write_bytes(b"")
    out = tmp_path / "run"
    dm = _dm(root, skip_bad_images=True, output_dir=str(out))
    dm.setup()
    assert sorted(p for p, _ in dm.bad_images) == sorted([garbage, zero])
    used = set(_paths(dm.train_samples + dm.val_samples))
    assert len(used) == 10 and garbage.as_posix() not in used
    lines = (out / "bad_images.txt").read_text().splitlines()
    assert len(lines) == 2 and all("\t" in line for line in lines)
    assert any(line.startswith(f"{zero}\tzero-byte file") for line in lines)
    assert "2 bad images skipped" in dm.describe()

    unchecked = _dm(root, verify_images=False)  # without verification nothing is checked at setup
    assert len(unchecked.train_samples) + len(unchecked.val_samples) == 12


def _pillow_rgb(path: Path, reduce: int = 1) -> np.ndarray:
    """The reference decode: Pillow (+ draft for reduced scale) + exif_transpose, as RGB."""
    from PIL import ImageOps

    with Image.open(path) as img:
        if reduce > 1:
            img.draft(img.mode, (img.size[0] // reduce, img.size[1] // reduce))
        img.load()
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def _assert_same_decode(got: np.ndarray, want: np.ndarray, name: str) -> None:
    """Two JPEG decoders' pixels: the same shape and, up to a few levels, the same values.

    OpenCV and Pillow may link different libjpeg builds (libjpeg-turbo versions, SIMD paths, IDCT and
    chroma upsampling variants), which round a few pixels differently; a wrong channel order, a missing
    rotation or another scale differs by tens of levels over most of the image.
    """
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8, (name, got.shape, want.shape)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 8 and diff.mean() <= 1.0, (name, int(diff.max()), float(diff.mean()))


def test_fast_jpeg_path_matches_pillow(tmp_path: Path) -> None:
    from visionsweep.data import images

    base = Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    variants = {
        "rgb.jpg": dict(img=base, quality=90),
        "progressive.jpg": dict(img=base, quality=85, progressive=True),
        "gray.jpg": dict(img=base.convert("L")),
        "rotated.jpg": dict(img=base, exif=exif),
        "subsampling444.jpg": dict(img=base, subsampling=0),
    }
    for name, kw in variants.items():
        path = _save(tmp_path / name, kw.pop("img"), **kw)
        assert images._jpeg_header(path.read_bytes())[0] == 8, name
        fast = images._load_jpeg_cv2(path, None)
        assert fast is not None, f"{name} should take the OpenCV path"
        _assert_same_decode(fast, _pillow_rgb(path), name)
        np.testing.assert_array_equal(load_rgb(path), fast, err_msg=name)
        half = images._load_jpeg_cv2(path, 50)  # short side 120 >= 2 x 50: decoded at 1/2 scale
        assert half.shape[0] * 2 == fast.shape[0] and half.shape[1] * 2 == fast.shape[1], name
        _assert_same_decode(half, _pillow_rgb(path, 2), f"{name} at 1/2 scale")
    # CMYK, PNG and truncated JPEGs are left to Pillow (None), which decodes or reports them
    cmyk = _save(tmp_path / "cmyk.jpg", base.convert("CMYK"))
    assert images._load_jpeg_cv2(cmyk, None) is None and load_rgb(cmyk).shape == (120, 160, 3)
    assert images._load_jpeg_cv2(_save(tmp_path / "p.png", base), None) is None
    cut = tmp_path / "cut.jpg"
    cut.write_bytes((tmp_path / "rgb.jpg").read_bytes()[:-10])
    assert images._jpeg_header(cut.read_bytes()) is None
