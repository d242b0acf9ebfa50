"""``data.classes`` (a subset of the class folders) and ``data.train_per_class`` (few-shot training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionsweep.data import FolderDataModule
from visionsweep.errors import ConfigError, DataError


def _set(root: Path, counts: dict[str, int]) -> Path:
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.random.default_rng(i).integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{c}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return _set(tmp_path_factory.mktemp("subsets") / "set", {str(d): 40 for d in range(6)})


def _dm(root: Path, **kw) -> FolderDataModule:
    dm = FolderDataModule(root=str(root), num_workers=0, val_fraction=0.2, test_fraction=0.3, **kw)
    dm.setup()
    return dm


def _names(samples) -> list[str]:
    return [p.name for p, _ in samples]


def test_class_subset_relabels_and_ignores_other_folders(root):
    dm = _dm(root, classes=[5, 3, 4])  # ints, unsorted: as Hydra gives data.classes=[5,3,4]
    assert dm.classes == ["3", "4", "5"] and dm.num_classes == 3
    every = dm.train_samples + dm.val_samples + dm.test_samples
    assert len(every) == 120 and {p.parent.name for p, _ in every} == {"3", "4", "5"}
    assert all(dm.classes[y] == p.parent.name for p, y in every)  # labels follow the subset's order
    assert dm.fingerprint()["n_files"] == 120
    assert dm.describe().startswith("set: 3 classes (3, 4, 5), 60 train / 24 val / 36 test")


def test_train_per_class_keeps_exact_counts_and_leaves_val_test_alone(root, tmp_path):
    full = _dm(root, classes=["0", "1", "2"])
    few = _dm(root, classes=["0", "1", "2"], train_per_class=5, output_dir=str(tmp_path / "run"))
    counts = np.bincount([y for _, y in few.train_samples], minlength=3)
    assert counts.tolist() == [5, 5, 5]
    assert set(_names(few.train_samples)) < set(_names(full.train_samples))
    assert _names(few.val_samples) == _names(full.val_samples)
    assert _names(few.test_samples) == _names(full.test_samples)
    assert "15 train / 24 val / 36 test" in few.describe() and "5 train images per class" in few.describe()
    assert len((tmp_path / "run" / "splits" / "train.csv").read_text().splitlines()) == 1 + 15
    # re-using the written split reproduces the same few images
    again = _dm(root, split_dir=str(tmp_path / "run" / "splits"), train_per_class=5)
    assert _names(again.train_samples) == _names(few.train_samples)


def test_train_per_class_depends_on_the_split_seed_only(root):
    a = _names(_dm(root, classes=[0, 1], train_per_class=4, split_seed=0).train_samples)
    b = _names(_dm(root, classes=[0, 1], train_per_class=4, split_seed=0).train_samples)
    c = _names(_dm(root, classes=[0, 1], train_per_class=4, split_seed=1).train_samples)
    assert a == b and a != c
    assert len(set(a)) == 8


def test_subset_works_with_split_folders(tmp_path):
    root = tmp_path / "presplit"
    _set(root / "train", {"a": 6, "b": 6, "c": 6})
    _set(root / "val", {"a": 2, "b": 2, "c": 2})
    dm = FolderDataModule(root=str(root), num_workers=0, classes=["b", "c"], train_per_class=3)
    dm.setup()
    assert dm.classes == ["b", "c"] and len(dm.train_samples) == 6 and len(dm.val_samples) == 4
    assert {y for _, y in dm.val_samples} == {0, 1}


@pytest.mark.parametrize(("kw", "match"), [
    ({"classes": "789"}, r"data.classes=789: give a list"),
    ({"classes": [7]}, r"at least two classes"),
    ({"classes": [1, "1"]}, r"names a class twice"),
    ({"classes": [[1], 2]}, r"each entry must be a class folder name"),
    ({"train_per_class": 0}, r"data.train_per_class=0: give a whole number >= 1"),
    ({"train_per_class": 2.5}, r"data.train_per_class=2.5"),
    ({"train_per_class": True}, r"data.train_per_class=True"),
])
def test_bad_values_are_one_line_config_errors(root, kw, match):
    with pytest.raises(ConfigError, match=match) as info:
        FolderDataModule(root=str(root), num_workers=0, **kw)
    assert "\n" not in str(info.value)


def test_unknown_class_and_too_few_images_are_one_line_data_errors(root):
    with pytest.raises(DataError, match=r"no class folder '9' in .* \(classes there: 0, 1, 2, 3, 4, 5\)") as info:
        _dm(root, classes=[0, 9])
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"train_per_class=30 but the training split has fewer images "
                                         r"\(0: 20, 1: 20\)") as info:
        _dm(root, classes=[0, 1], train_per_class=30)
    assert "\n" not in str(info.value)
