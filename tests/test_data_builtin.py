"""Tests of visionsweep.data: built-in data sets, fingerprints and data loaders."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionsweep.data import (
    BUILTIN,
    FolderDataModule,
    ImageFolderDataset,
    ensure_builtin,
    export_digits,
    load_rgb,
    write_shapes,
)
from visionsweep.errors import ConfigError, DataError


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(10, 12, 3), dtype=np.uint8)


def _simple_set(root: Path, counts: dict[str, int]) -> Path:
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(_rgb(i)).save(root / c / f"{i:03d}.png")
    return root


def _dm(root: Path, **kwargs) -> FolderDataModule:
    kwargs.setdefault("num_workers", 0)
    return FolderDataModule(root=str(root), **kwargs)


# ----------------------------------------------------------------------------- built-in sets
def test_export_digits(tmp_path: Path) -> None:
    root = tmp_path / "digits"
    threads = [threading.Thread(target=export_digits, args=(root,)) for _ in range(2)]  # racing writers
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (root / ".complete").is_file()
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == [str(d) for d in range(10)]
    files = sorted(root.glob("*/*.png"))
    assert len(files) == 1797 and files[0].name == "0000.png"
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no temp dirs left behind
    img = Image.open(files[0])
    arr = np.asarray(img)
    from sklearn.datasets import load_digits

    expected = np.round(load_digits().images[0] * 255 / 16)  # 0..16 scaled to 0..255, kept 8x8
    assert img.mode == "L" and arr.shape == (8, 8)
    np.testing.assert_array_equal(arr, expected)
    stamp = files[0].stat().st_mtime_ns
    assert export_digits(root) == root and ensure_builtin("digits", root) == root
    assert files[0].stat().st_mtime_ns == stamp  # not rewritten

    dm = _dm(root, builtin="digits", val_fraction=0.1, test_fraction=0.1)
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == 10 and dm.has_test
    assert dm.describe().startswith("digits: 10 classes, ") and "(seeded split, seed 0)" in dm.describe()
    assert len(dm.train_samples) + len(dm.val_samples) + len(dm.test_samples) == 1797


def test_lost_race_keeps_the_winner(tmp_path: Path) -> None:
    from visionsweep.data import builtin

    root = tmp_path / "set"

    def fill(tmp: Path) -> None:  # another process finishes while we are still writing
        write_shapes(root, n_per_class=2, size=16)
        (tmp / "ours.txt").write_text("x")

    assert builtin._write_atomically(root, "shapes", {}, fill) == root
    assert not (root / "ours.txt").exists() and len(list(root.glob("*/*.png"))) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_write_shapes_deterministic(tmp_path: Path) -> None:
    a = write_shapes(tmp_path / "a", n_per_class=4, size=32, seed=5)
    b = write_shapes(tmp_path / "b", n_per_class=4, size=32, seed=5)
    c = write_shapes(tmp_path / "c", n_per_class=4, size=32, seed=6)
    files_a = sorted(p.relative_to(a) for p in a.glob("*/*.png"))
    assert len(files_a) == 12 and {p.parts[0] for p in files_a} == {"circle", "square", "triangle"}
    assert files_a == sorted(p.relative_to(b) for p in b.glob("*/*.png"))
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in files_a)
    assert any((a / p).read_bytes() != (c / p).read_bytes() for p in files_a)
    arr = load_rgb(a / "circle" / "0000.png")
    assert arr.shape == (32, 32, 3) and arr.std() > 10
    assert (a / ".complete").is_file()


def test_ensure_builtin(tmp_path: Path) -> None:
    assert set(BUILTIN) == {"digits", "shapes", "shapes_multi"}
    with pytest.raises(ConfigError, match="digits, shapes, shapes_multi"):
        ensure_builtin("mnist", tmp_path / "x")
    with pytest.raises(ConfigError, match="data.builtin 'mnist'"):
        _dm(tmp_path / "x", builtin="mnist")
    root = ensure_builtin("shapes", tmp_path / "shapes")
    assert len(list(root.glob("*/*.png"))) == 3 * 40
    with pytest.raises(ConfigError, match="hexagon"):
        write_shapes(tmp_path / "y", classes=("circle", "hexagon"))
    half = tmp_path / "half"
    (half / "junk").mkdir(parents=True)  # non-empty folder without marker: never overwritten
    with pytest.raises(DataError, match=f"'{half}' exists but is not a complete"):
        ensure_builtin("shapes", half)


# ----------------------------------------------------------------------------- module API
def test_fingerprint_tracks_file_sizes(tmp_path: Path) -> None:
    root = _simple_set(tmp_path / "set", {"a": 3, "b": 3})
    dm = _dm(root)
    before = dm.fingerprint()
    assert before["n_files"] == 6 and len(before["sha256"]) == 64
    assert _dm(root).fingerprint() == before
    victim = root / "a" / "000.png"
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert dm.fingerprint()["sha256"] != before["sha256"]
    victim.unlink()
    with pytest.raises(DataError, match=str(victim)):
        dm.fingerprint()


def test_dataloaders_yield_uint8(tmp_path: Path) -> None:
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    root = _simple_set(tmp_path / "set", {"a": 6, "b": 6})
    dm = _dm(root, batch_size=4, val_fraction=0.25,
             train_transform=A.Compose([A.Resize(16, 16), A.HorizontalFlip(p=0.5)]),
             eval_transform=A.Compose([A.Resize(20, 20), ToTensorV2()]))
    dm.setup()
    dm.setup("test")  # idempotent
    assert dm.pin_memory == torch.cuda.is_available()
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (4, 3, 16, 16) and y.dtype == torch.int64
    x, _ = next(iter(dm.val_dataloader()))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (4, 3, 20, 20)
    assert not dm.has_test
    assert len(dm.test_dataloader().dataset) == len(dm.val_samples) == 4
    assert len(dm.predict_dataloader().dataset) == 4
    loader = _dm(root, num_workers=1, persistent_workers=True).train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 1
    assert not _dm(root, num_workers=0).train_dataloader().persistent_workers

    # Workers get pickled copies of the pipeline: each must be reseeded or they all draw alike.
    same = _simple_set(tmp_path / "same", {"a": 1, "b": 1})
    same_img = load_rgb(same / "a" / "000.png")
    for i in range(4):
        Image.fromarray(same_img).save(same / "a" / f"dup{i}.png")
    samples = [(p, 0) for p in sorted((same / "a").iterdir())]
    random_tf = A.Compose([A.RandomCrop(6, 6), A.HorizontalFlip(), A.RandomBrightnessContrast(p=1)], seed=1)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ImageFolderDataset(samples, random_tf), batch_size=1, num_workers=2)
    first, second = [x for x, _ in itertools.islice(loader, 2)]  # item 0 from worker 0, item 1 from worker 1
    assert not torch.equal(first, second)

    to_float = ImageFolderDataset(dm.train_samples, A.Compose([A.Normalize()]))
    with pytest.raises(ConfigError, match="uint8"):
        to_float[0]


def test_shapes_multi_lists_each_image_once_with_the_shapes_it_holds(tmp_path: Path) -> None:
    import csv

    import numpy as np
    from PIL import Image

    from visionsweep.data.builtin import write_shapes_multi

    root = write_shapes_multi(tmp_path / "m", n_images=200, size=32, seed=3)
    rows = list(csv.DictReader((root / "labels.csv").open()))
    assert [r["path"] for r in rows] == [f"images/{i:04d}.png" for i in range(200)]
    assert sorted(p.relative_to(root).as_posix() for p in root.glob("images/*.png")) == [r["path"] for r in rows]
    sets = [r["labels"].split() for r in rows]
    assert all(len(s) == len(set(s)) and set(s) <= {"circle", "square", "triangle"} for s in sets)
    sizes = [len(s) for s in sets]
    assert set(sizes) == {0, 1, 2, 3}  # presence 0.5 each: every count occurs in 200 images
    for name in ("circle", "square", "triangle"):
        assert 0.35 < sum(name in s for s in sets) / 200 < 0.65, name
    # a shape is a flat patch of one colour: an image with shapes holds many pixels equal to a common
    # non-background value, one without holds none (the textured background never repeats that much)
    def flat_pixels(path: str) -> int:
        img = np.asarray(Image.open(root / path)).reshape(-1, 3)
        _, counts = np.unique(img, axis=0, return_counts=True)
        return int(counts.max())
    empty = [r["path"] for r, s in zip(rows, sets) if not s][:5]
    full = [r["path"] for r, s in zip(rows, sets) if len(s) == 3][:5]
    assert max(map(flat_pixels, empty)) < min(map(flat_pixels, full))
    again = write_shapes_multi(tmp_path / "again", n_images=200, size=32, seed=3)
    assert (again / "labels.csv").read_text() == (root / "labels.csv").read_text()
