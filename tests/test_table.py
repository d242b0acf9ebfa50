"""Tests of data=table (visionsweep.data.table): labels from a CSV / TSV / Parquet table.

Tiny 8 px images made in tmp_path; nothing is trained.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionsweep.data.table import TableDataModule
from visionsweep.errors import ConfigError, DataError


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _table(root: Path, header: list[str], rows: list[list], name: str = "labels.csv", images: bool = True) -> Path:
    """Write ``root/name`` (CSV or TSV) and, when ``images``, a tiny image for every path in column 0."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / name).open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, delimiter="\t" if name.endswith(".tsv") else ",").writerows([header, *rows])
    for i, row in enumerate(rows):
        if images and not (root / row[0]).exists():
            _image(root / row[0], i)
    return root / name


def _dm(root: Path, file: Path | str, **kwargs) -> TableDataModule:
    kwargs.setdefault("num_workers", 0)
    return TableDataModule(root=str(root), file=str(file), **kwargs)


def _rel(samples, root: Path) -> list[tuple[str, object]]:
    return [(p.relative_to(root).as_posix(), y) for p, y in samples]


def _per_class(root: Path, counts: dict[str, int]) -> list[list]:
    return [[f"img/{c}_{i:02d}.png", c] for c, n in counts.items() for i in range(n)]


def _error(exc_type: type, call) -> str:
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- splits
def test_split_column_gives_that_split(tmp_path: Path) -> None:
    root = tmp_path / "set"
    # train/ and val/ sub-folders must not be taken for split folders: the table says the split
    rows = [["train/cat/1.png", "cat", "Train"], ["train/dog/2.png", "dog", "TRAIN"], ["val/c.png", "cat", "valid"],
            ["val/d.png", "dog", "validation"], ["x/deep/e.png", "dog", "test"], ["f.png", "cat", "train"]]
    table = _table(root, ["path", "label", "split"], rows)
    dm = _dm(root, "labels.csv", split_col="split", val_fraction=0.5)  # relative: found under root
    dm.setup()
    assert dm.classes == ["cat", "dog"] and dm.split_source == "seeded"
    assert _rel(dm.train_samples, root) == [("f.png", 0), ("train/cat/1.png", 0), ("train/dog/2.png", 1)]
    assert _rel(dm.val_samples, root) == [("val/c.png", 0), ("val/d.png", 1)]
    assert _rel(dm.test_samples, root) == [("x/deep/e.png", 1)]
    assert all(isinstance(p, Path) and type(y) is int for p, y in dm.train_samples)
    assert "3 train / 2 val / 1 test (split column 'split' of labels.csv)" in dm.describe()
    assert _dm(root, table, split_col="split").classes == ["cat", "dog"]  # an absolute file


def test_seeded_split_is_reproducible_and_stratified(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _table(root, ["path", "label"], _per_class(root, {"a": 10, "b": 10, "c": 20}))
    first = _dm(root, root / "labels.csv", val_fraction=0.2, test_fraction=0.1, split_seed=3)
    again = _dm(root, root / "labels.csv", val_fraction=0.2, test_fraction=0.1, split_seed=3)
    other = _dm(root, root / "labels.csv", val_fraction=0.2, test_fraction=0.1, split_seed=4)
    assert first.val_samples == again.val_samples and first.train_samples == again.train_samples
    assert first.val_samples != other.val_samples
    count = {s: np.bincount([y for _, y in getattr(first, f"{s}_samples")], minlength=3).tolist()
             for s in ("train", "val", "test")}
    assert count == {"train": [7, 7, 14], "val": [2, 2, 4], "test": [1, 1, 2]}
    assert "seeded split, seed 3, from labels.csv" in first.describe()
    # k-fold: the validation folds are disjoint and cover the non-test images
    folds = [_dm(root, root / "labels.csv", folds=3, fold=k, test_fraction=0.1) for k in range(3)]
    vals = [p for dm in folds for p, _ in dm.val_samples]
    assert len(vals) == len(set(vals)) == 40 - len(folds[0].test_samples)


def test_tsv_and_parquet_read_like_csv(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    root = tmp_path / "set"
    rows = [*_per_class(root, {"a": 4, "b": 5})]
    rows = [[p, c, "val" if i % 3 == 0 else "train"] for i, (p, c) in enumerate(rows)]
    _table(root, ["path", "label", "split"], rows)
    _table(root, ["path", "label", "split"], rows, name="labels.tsv", images=False)
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_parquet(root / "labels.parquet")
    got = []
    for name in ("labels.csv", "labels.tsv", "labels.parquet"):
        dm = _dm(root, root / name, split_col="split")
        got.append((dm.classes, dm.train_samples, dm.val_samples))
    assert got[0] == got[1] == got[2] and len(got[0][1]) == 6


def test_parquet_numbers_and_one_hot_columns(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    root = tmp_path / "set"
    paths = [f"{i}.png" for i in range(6)]
    for i, p in enumerate(paths):
        _image(root / p, i)
    frame = pd.DataFrame({"path": paths, "label": [3, 5, 3, 5, 3, 5], "x": [1.0, 0.0, 1.0, 1.0, 0.0, 1.0],
                          "y": [True, True, False, False, True, False]})
    frame.to_parquet(root / "t.parquet")
    assert _dm(root, root / "t.parquet").classes == ["3", "5"]  # integer labels read as their text
    dm = _dm(root, root / "t.parquet", label_cols=["x", "y"], multilabel=True, val_fraction=0.3)
    assert sorted(y for _, y in dm.train_samples + dm.val_samples) == [(0, 1), (0, 1), (1, 0), (1, 0), (1, 0),
                                                                        (1, 1)]


# ----------------------------------------------------------------------------- multi-label
def test_multilabel_label_sep(tmp_path: Path) -> None:
    root = tmp_path / "set"
    rows = [["a.png", "dog cat", "train"], ["b.png", "", "train"], ["c.png", "cat", "val"], ["d.png", " bird ", "train"]]
    _table(root, ["path", "tags", "split"], rows)
    dm = _dm(root, root / "labels.csv", label_col="tags", split_col="split", multilabel=True)  # default sep: space
    assert dm.multilabel and dm.classes == ["bird", "cat", "dog"]
    assert _rel(dm.train_samples, root) == [("a.png", (0, 1, 1)), ("b.png", (0, 0, 0)), ("d.png", (1, 0, 0))]
    assert _rel(dm.val_samples, root) == [("c.png", (0, 1, 0))]
    assert "3 classes (multi-label)" in dm.describe()
    rows = [["a.png", "dog,cat"], ["b.png", "cat"], ["c.png", "dog"], ["d.png", "cat"]]
    _table(root, ["path", "tags"], rows, name="comma.csv")
    dm = _dm(root, root / "comma.csv", label_col="tags", label_sep=",", multilabel=True, val_fraction=0.25)
    assert dm.classes == ["cat", "dog"] and len(dm.train_samples + dm.val_samples) == 4


def test_multilabel_label_cols(tmp_path: Path) -> None:
    root = tmp_path / "set"
    rows = [["a.png", "1", "0", "1"], ["b.png", "0", "1", "1"], ["c.png", "0", "0", "0"], ["d.png", "1", "1", "0"]]
    _table(root, ["path", "zebra", "ant", "moth"], rows)
    dm = _dm(root, root / "labels.csv", label_cols=["zebra", "ant", "moth"], multilabel=True, val_fraction=0.25)
    assert dm.classes == ["zebra", "ant", "moth"]  # column order, not sorted
    everything = dict(_rel(dm.train_samples + dm.val_samples, root))
    assert everything == {"a.png": (1, 0, 1), "b.png": (0, 1, 1), "c.png": (0, 0, 0), "d.png": (1, 1, 0)}


def test_long_format_rows_merge(tmp_path: Path) -> None:
    root = tmp_path / "set"
    rows = [["a.png", "cat"], ["a.png", "dog"], ["./a.png", "cat"], ["b.png", "dog"], ["c.png", "cat"], ["d.png", "cat"]]
    _table(root, ["path", "label"], rows)
    dm = _dm(root, root / "labels.csv", multilabel=True, val_fraction=0.25)
    everything = dict(_rel(dm.train_samples + dm.val_samples, root))
    assert everything == {"a.png": (1, 1), "b.png": (0, 1), "c.png": (1, 0), "d.png": (1, 0)}
    # single-label: a repeated row with the same label is one sample
    rows = [["a.png", "cat"], ["a.png", "cat"], ["b.png", "dog"], ["c.png", "cat"], ["d.png", "dog"]]
    single = _dm(root, _table(root, ["path", "label"], rows, name="single.csv"), val_fraction=0.5)
    assert len(single.train_samples + single.val_samples) == 4


def test_multilabel_seeded_split_by_rarest_label(tmp_path: Path) -> None:
    root = tmp_path / "set"
    # "common" is on every image: stratifying by the rarest label spreads rare1 / rare2 over both splits
    rows = [[f"{i}.png", "common " + ("rare1" if i < 6 else "rare2" if i < 12 else "")] for i in range(16)]
    _table(root, ["path", "label"], rows)
    dm = _dm(root, root / "labels.csv", multilabel=True, val_fraction=0.5, split_seed=1)
    val = [y for _, y in dm.val_samples]
    assert dm.classes == ["common", "rare1", "rare2"] and len(val) == 8
    assert sum(y[1] for y in val) == 3 and sum(y[2] for y in val) == 3 and val.count((1, 0, 0)) == 2
    assert dm.val_samples == _dm(root, root / "labels.csv", multilabel=True, val_fraction=0.5, split_seed=1).val_samples


# ----------------------------------------------------------------------------- split files
@pytest.mark.parametrize("multilabel", [False, True])
def test_split_files_round_trip(tmp_path: Path, multilabel: bool) -> None:
    root, run = tmp_path / "set", tmp_path / "run"
    labels = ["b a", "a", "", "b", "a b", "b", "a", "a"] if multilabel else ["a", "b", "a", "b", "a", "b", "a", "b"]
    rows = [[f"sub/{i}.png", y, "test" if i == 7 else "val" if i in (0, 3) else "train"] for i, y in enumerate(labels)]
    _table(root, ["path", "label", "split"], rows)
    first = _dm(root, root / "labels.csv", split_col="split", multilabel=multilabel, output_dir=str(run))
    first.setup()
    again = _dm(root, "no-table-needed.csv", multilabel=multilabel, split_dir=str(run / "splits"))
    assert again.classes == first.classes == ["a", "b"]
    for split in ("train", "val", "test"):
        assert getattr(again, f"{split}_samples") == getattr(first, f"{split}_samples")
    val = (run / "splits" / "val.csv").read_text().splitlines()
    assert val == (["path,label,class", "sub/0.png,0 1,a|b", "sub/3.png,1,b"] if multilabel
                   else ["path,label,class", "sub/0.png,0,a", "sub/3.png,1,b"])
    assert again.split_source == "split_dir"
    if multilabel:
        assert "sub/2.png,,\n" in (run / "splits" / "train.csv").read_text()  # no labels: empty cells
        (run / "splits" / "val.csv").write_text("path,label,class\nsub/0.png,0 1,b|a\n")
        message = _error(DataError, lambda: _dm(root, "x.csv", multilabel=True, split_dir=str(run / "splits")).setup())
        assert "val.csv' line 2: class index 0 is 'b' but 'a'" in message and "train.csv' line" in message


# ----------------------------------------------------------------------------- errors
BAD_TABLES = [  # (header, rows, options, error, what the message must name)
    (["file", "label"], [["a.png", "x"]], {}, DataError, ["no column 'path'", "its columns: file, label",
                                                           "data.path_col"]),
    (["path", "label"], [["a.png", "x"], ["gone.png", "y"]], {}, DataError,
     ["data row 2 (line 3)", "image 'gone.png' does not exist"]),
    (["path", "label"], [["a.png", "x"], ["../up.png", "y"]], {}, DataError,
     ["data row 2 (line 3)", "'../up.png' is outside data.root"]),
    (["path", "label", "split"], [["a.png", "x", "train"], ["b.png", "y", "holdout"]], {"split_col": "split"},
     DataError, ["data row 2", "split 'holdout'", "train, val (valid, validation) or test"]),
    (["path", "label"], [["a.png", "x"], ["b.png", ""]], {}, DataError, ["data row 2", "column 'label' is empty"]),
    (["path", "cat", "dog"], [["a.png", "1", "0"], ["b.png", "yes", "1"]],
     {"label_cols": ["cat", "dog"], "multilabel": True}, DataError, ["data row 2", "column 'cat' holds 'yes'", "0 or 1"]),
    (["path", "label"], [], {}, DataError, ["has no data rows"]),
    (["path", "label"], [["a.png", "x"], ["b.png", "x"]], {}, DataError, ["only one class ('x')", "two classes"]),
    (["path", "label"], [["a.png", "x"], ["b.png", "y"], ["a.png", "y"]], {}, DataError,
     ["data rows 1 and 3", "'a.png' different labels ('x', 'y')", "task=multilabel"]),
    (["path", "label", "split"], [["a.png", "x", "train"], ["b.png", "y", "val"], ["c.png", "x", "val"]],
     {"split_col": "split"}, DataError, ["class 'y' of '", "has no image in the training split", "column 'split'"]),
    (["path", "label", "split"], [["a.png", "x", "train"], ["b.png", "y", "train"]], {"split_col": "split"},
     DataError, ["puts no (readable) image in val (column 'split')"]),
    (["path", "label"], [["a.png", "x"], ["b.png", "y"]], {"label_sep": ","}, ConfigError,
     ["data.label_sep", "add task=multilabel"]),
    (["path", "label"], [["a.png", "x"], ["b.png", "y"]], {"multilabel": True, "classes": ["x", "y"]}, ConfigError,
     ["data.classes is not supported with multi-label"]),
    (["path", "label"], [["a.png", "x"], ["b.png", "y"]], {"multilabel": True, "train_per_class": 1}, ConfigError,
     ["data.train_per_class is not supported with multi-label"]),
    (["path", "label"], [["a.png", "x"], ["b.png", "y"]], {"classes": ["x", "nope"]}, DataError,
     ["no label 'nope'", "labels there: x, y"]),
]


@pytest.mark.parametrize(("header", "rows", "options", "error", "names"), BAD_TABLES,
                         ids=[f"{i}-{case[4][0][:24]}" for i, case in enumerate(BAD_TABLES)])
def test_bad_table_gives_one_line_naming_it(tmp_path: Path, header, rows, options, error, names) -> None:
    root = tmp_path / "set"
    file = _table(root, header, [r for r in rows if r[0] != "gone.png"])
    if any(r[0] == "gone.png" for r in rows):  # listed, but no image written
        _table(root, header, rows, images=False)
    if any(r[0] == "../up.png" for r in rows):
        (tmp_path / "up.png").write_bytes((root / "a.png").read_bytes())  # exists, but outside the root
    message = _error(error, lambda: _dm(root, file, val_fraction=0.5, **options).setup())
    for name in names:
        assert name in message, (name, message)


def test_missing_table_and_bad_file_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "set"
    root.mkdir()
    monkeypatch.chdir(tmp_path)
    message = _error(DataError, lambda: _dm(root, "nope.csv").setup())
    assert f"'{tmp_path / 'nope.csv'}' and '{root / 'nope.csv'}'" in message
    assert "'t.xlsx': give a .csv, .tsv or .parquet table" in _error(ConfigError, lambda: _dm(root, "t.xlsx"))
    assert "both set" in _error(ConfigError, lambda: _dm(root, "t.csv", label_sep=" ", label_cols=["a", "b"],
                                                          multilabel=True))
    (root / "bad.csv").write_bytes(b"path,label\n\xff\xfe.png,x\n")
    assert "not a UTF-8 CSV file" in _error(DataError, lambda: _dm(root, "bad.csv").setup())


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pandas")
    root = tmp_path / "set"
    root.mkdir()
    (root / "t.parquet").write_bytes(b"PAR1")
    for engine in ("pyarrow", "fastparquet"):  # None in sys.modules: "import pyarrow" raises ImportError
        monkeypatch.setitem(sys.modules, engine, None)
    assert "pip install pyarrow" in _error(DataError, lambda: _dm(root, "t.parquet").setup())


def test_bad_images_fail_or_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "set"
    file = _table(root, ["path", "label"], _per_class(root, {"a": 3, "b": 3}))
    broken = root / "img/a_01.png"
    broken.write_bytes(b"not a png at all" * 4)
    assert str(broken) in _error(DataError, lambda: _dm(root, file).setup())
    dm = _dm(root, file, skip_bad_images=True, val_fraction=0.4)
    dm.setup()
    assert [p for p, _ in dm.bad_images] == [broken]
    assert broken not in [p for p, _ in dm.train_samples + dm.val_samples] and "1 bad images skipped" in dm.describe()


def test_config_composes_and_instantiates(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from conftest import compose_cfg

    root = tmp_path / "set"
    _table(root, ["path", "label"], _per_class(root, {"a": 3, "b": 3}))
    cfg = compose_cfg(tmp_path / "run", ["data=table", f"data.root={root}", "data.file=labels.csv", "debug=fast"])
    assert cfg.data.label_col == "label" and cfg.data.multilabel is False and cfg.data.cache == "none"
    dm = instantiate(cfg.data, output_dir=None, train_transform=None, eval_transform=None, image_size=32)
    assert isinstance(dm, TableDataModule) and dm.classes == ["a", "b"] and dm.num_workers == 0
    assert os.path.basename(str(dm.file)) == "labels.csv"
