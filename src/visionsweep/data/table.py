"""Image labels from a table (``data=table``): a CSV, TSV or Parquet file of image paths and labels.

Each row names an image (relative to ``data.root``, sub-folders allowed) and its label(s):

* single-label: one label per image in ``label_col``; samples are ``(path, class index)``;
* multi-label (``task=multilabel``): several labels in ``label_col`` separated by ``label_sep``, or one
  0/1 column per class (``label_cols``); samples are ``(path, multi-hot tuple)``. A path listed on several
  rows is one sample with the union of their labels (long format: one ``(image, label)`` pair a row).

The split comes from ``split_col`` (train / val / test) when given, else from the seeded stratified split
(or k-fold) of :class:`~visionsweep.data.folder.FolderDataModule`. A multi-label image is stratified by its
rarest positive label (fewest images in the table; ties: the lowest class index), an image without labels
by the group ``none``; the per-group split is :func:`~visionsweep.data.splits.stratified_split` /
:func:`~visionsweep.data.splits.kfold_split`.

Multi-label split files hold, per image, the positive class indices joined by a space (``label``) and
their names joined by ``|`` (``class``), so ``data.split_dir`` rebuilds exactly the same samples.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from visionsweep.data.folder import FolderDataModule
from visionsweep.data.scan import SplitRow, csv_path
from visionsweep.data.splits import SPLITS, check_holdouts, kfold_split, stratified_split
from visionsweep.errors import ConfigError, DataError
from visionsweep.utils.checks import flag

SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SUFFIXES = (".csv", ".tsv", ".parquet")
TableRow = tuple[int, int | None, dict[str, str]]  # (1-based data row, file line or None, cells)
Labels = tuple[int, ...] | int  # a multi-hot tuple (multi-label) or a class index


def _cell(value: Any) -> str:
    """A table cell as stripped text (Parquet gives numbers, bools and nulls; 1.0 reads as 1)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if type(value).__name__ in ("bool", "bool_"):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def read_table(path: Path) -> tuple[list[str], list[TableRow]]:
    """The columns and rows of a ``.csv`` / ``.tsv`` (UTF-8) or ``.parquet`` table.

    Raises:
        DataError: Not UTF-8 / CSV, not Parquet, or pyarrow missing for a Parquet file.
    """
    if path.suffix.lower() == ".parquet":
        try:  # pandas + pyarrow are optional: only a Parquet table needs them
            import pandas as pd

            frame = pd.read_parquet(path)
        except ImportError as e:
            raise DataError(f"reading the Parquet table '{path}' needs pyarrow ({e.name or 'not installed'}): "
                            "pip install pyarrow pandas, or save the table as CSV") from None
        except Exception as e:  # pyarrow's errors share no base class worth naming
            raise DataError(f"'{path}' is not a readable Parquet file ({type(e).__name__}): check data.file") from None
        columns = [str(c) for c in frame.columns]
        frame = frame.astype(object).where(frame.notna(), None)
        return columns, [(n, None, {c: _cell(v) for c, v in zip(columns, rec)})
                         for n, rec in enumerate(frame.itertuples(index=False, name=None), start=1)]
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's byte-order mark
            reader = csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            rows = [(n, reader.line_num, {k: _cell(v) for k, v in row.items() if k is not None})
                    for n, row in enumerate(reader, start=1)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"'{path}' is not a UTF-8 {path.suffix[1:].upper()} file ({type(e).__name__}): "
                        "save it as UTF-8 text") from None
    return columns, rows


class TableDataModule(FolderDataModule):
    """Classification data listed in a table of image paths and labels (see the module docstring).

    Args:
        root: Data folder; the table's paths are relative to it.
        file: The table: ``.csv``, ``.tsv`` (tab-separated) or ``.parquet``. A relative path is looked up
            in the current folder, then under ``root``.
        path_col: Column of image paths relative to ``root``.
        label_col: Column of labels (several, separated by ``label_sep``, when multi-label).
        label_sep: Separator of several labels in ``label_col`` (multi-label), e.g. ``" "``.
        label_cols: One 0/1 column per class (multi-label); the classes are these names in this order.
        split_col: Column of ``train`` / ``val`` (``valid``, ``validation``) / ``test`` (any case); None:
            the seeded split (``val_fraction``, ``test_fraction``, ``split_seed``, ``folds``).
        multilabel: Multi-label data (``task=multilabel`` sets it); without ``label_sep`` / ``label_cols``
            the labels in ``label_col`` are separated by spaces.
        **folder_args: Every other :class:`~visionsweep.data.folder.FolderDataModule` argument.

    Raises:
        ConfigError: A bad option, ``label_sep`` / ``label_cols`` without ``task=multilabel``, or an
            option multi-label data does not support (``classes``, ``train_per_class``).
    """

    split_folders = False  # a train/ folder under root is just a folder of images: the table says the split

    def __init__(self, root: str, *, file: str, path_col: str = "path", label_col: str = "label",
                 label_sep: str | None = None, label_cols: Sequence[str] | None = None, split_col: str | None = None,
                 multilabel: bool = False, **folder_args: Any) -> None:
        super().__init__(root=root, **folder_args)
        if not file or not isinstance(file, (str, os.PathLike)):
            raise ConfigError(f"data.file={file}: give the labels table, e.g. data.file=labels.csv")
        self.file = Path(os.fspath(file)).expanduser()
        if self.file.suffix.lower() not in SUFFIXES:
            raise ConfigError(f"data.file='{file}': give a .csv, .tsv or .parquet table")
        self.path_col, self.label_col = _column(path_col, "data.path_col"), _column(label_col, "data.label_col")
        self.split_col = _column(split_col, "data.split_col") if split_col else None
        if label_cols is not None and (isinstance(label_cols, str) or not isinstance(label_cols, Sequence)):
            raise ConfigError(f"data.label_cols={label_cols}: give a list of 0/1 columns, e.g. [cat,dog]")
        self.label_cols = [_column(c, "data.label_cols") for c in label_cols or []] or None
        if self.label_cols and (len(set(self.label_cols)) != len(self.label_cols) or len(self.label_cols) < 2):
            raise ConfigError(f"data.label_cols={self.label_cols}: give two or more different columns")
        if label_sep is not None and (not isinstance(label_sep, str) or not label_sep):
            raise ConfigError(f"data.label_sep={label_sep!r}: give a non-empty separator, e.g. ' ' or ','")
        if label_sep is not None and self.label_cols:
            raise ConfigError("data.label_sep and data.label_cols both set: labels are either separated in "
                              "one column or one 0/1 column per class; set one of them to null")
        self.multilabel = flag(multilabel, "data.multilabel")
        given = "data.label_sep" if label_sep is not None else "data.label_cols" if self.label_cols else ""
        if given and not self.multilabel:
            raise ConfigError(f"{given} gives several labels per image: add task=multilabel to the command")
        self.label_sep = " " if self.multilabel and not given else label_sep
        for key, on in (("data.classes", self.class_subset), ("data.train_per_class", self.train_per_class)):
            if on and self.multilabel:
                raise ConfigError(f"{key} is not supported with multi-label data: set {key}=null")
        if self.kfold and self.split_col:
            raise ConfigError(f"data.folds={self.kfold[0]}: the table's column '{self.split_col}' already splits "
                              "the data; set data.split_col=null for k-fold, or data.folds=null")
        self._table: Path | None = None

    # ------------------------------------------------------------------ the table
    def _find_table(self) -> Path:
        tried = [self.file] if self.file.is_absolute() else [Path.cwd() / self.file, self.root / self.file]
        for path in tried:
            if path.is_file():
                return path
        raise DataError(f"labels table not found: tried {' and '.join(repr(str(p)) for p in tried)}; set data.file "
                        "to the table (a relative path is looked up in the current folder, then under data.root)")

    def _at(self, n: int, line: int | None) -> str:
        return f"'{self._table}' data row {n}" + (f" (line {line})" if line else "")

    def _read(self) -> tuple[list[str], dict[Path, tuple[int, Any, str | None]]]:
        """The class names and ``{image: (data row, label name(s), split or None)}`` of the table."""
        self._table = path = self._find_table()
        columns, rows = read_table(path)
        if not rows:
            raise DataError(f"'{path}' has no data rows: list one image a row (columns {self.path_col}, "
                            f"{', '.join(self.label_cols or [self.label_col])})")
        wanted = [(self.path_col, "data.path_col"), (self.split_col, "data.split_col"),
                  *((c, "data.label_cols") for c in self.label_cols or [self.label_col])]
        for col, key in wanted:
            if col is not None and col not in columns:
                raise DataError(f"'{path}' has no column '{col}' (its columns: {', '.join(columns)}): "
                                f"set {key} to one of them")
        images: dict[Path, tuple[int, Any, str | None]] = {}
        for n, line, cells in rows:
            image, labels, split = self._row(n, line, cells)
            if image not in images:
                images[image] = (n, labels, split)
                continue
            first, old, old_split = images[image]
            where = f"'{path}' data rows {first} and {n}"
            if old_split != split:
                raise DataError(f"{where} put '{cells[self.path_col]}' in different splits ({old_split}, {split}): "
                                "keep one split per image")
            if not self.multilabel and old != labels:
                raise DataError(f"{where} give '{cells[self.path_col]}' different labels ('{old}', '{labels}'): keep "
                                "one row per image (several labels per image need task=multilabel)")
            images[image] = (first, old | labels if self.multilabel else old, split)
        if self.label_cols:
            classes = list(self.label_cols)
        elif self.multilabel:
            classes = sorted(set().union(*(labels for _, labels, _ in images.values())))
        else:
            classes = sorted({label for _, label, _ in images.values()})
        if self.multilabel and (bad := next((c for c in classes if "|" in c), None)):
            raise DataError(f"class '{bad}' in '{path}' contains '|', which split files put between class names: "
                            "rename it")
        return classes, images

    def _row(self, n: int, line: int | None, cells: dict[str, str]) -> tuple[Path, Any, str | None]:
        """One row's image, label name(s) (a name, or a frozenset when multi-label) and split."""
        rel = cells.get(self.path_col, "")
        if not rel:
            raise DataError(f"{self._at(n, line)}: column '{self.path_col}' is empty: give the image path "
                            "relative to data.root, or drop the row")
        pure = PurePosixPath(rel.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or PureWindowsPath(rel).drive:  # the split files' rule
            raise DataError(f"{self._at(n, line)}: path '{rel}' is outside data.root: list paths relative to "
                            "data.root (no absolute paths, no '..')")
        image = self.root / pure
        if not image.is_file():
            raise DataError(f"{self._at(n, line)}: image '{rel}' does not exist under data.root '{self.root}': "
                            "fix the path or data.root")
        split = None
        if self.split_col:
            split = SPLIT_VALUES.get(cells.get(self.split_col, "").lower())
            if split is None:
                raise DataError(f"{self._at(n, line)}: split '{cells.get(self.split_col, '')}' in column "
                                f"'{self.split_col}' is not train, val (valid, validation) or test: fix the row")
        text = cells.get(self.label_col, "")
        if self.label_cols:
            for col in self.label_cols:
                if cells.get(col, "") not in ("0", "1"):
                    raise DataError(f"{self._at(n, line)}: column '{col}' holds '{cells.get(col, '')}', expected "
                                    "0 or 1 (data.label_cols are one 0/1 column per class)")
            return image, frozenset(c for c in self.label_cols if cells[c] == "1"), split
        if self.multilabel:
            return image, frozenset(t.strip() for t in text.split(self.label_sep) if t.strip()), split
        if not text:
            raise DataError(f"{self._at(n, line)}: column '{self.label_col}' is empty: give every image a label, "
                            "or drop the row")
        return image, text, split

    # ------------------------------------------------------------------ finding the samples
    def _seeded_split(self) -> tuple[list[str], dict[str, list[Any]]]:
        """The table's samples, split by ``split_col`` or seeded (called by ``setup()`` without ``split_dir``)."""
        classes, images = self._read()
        if self.class_subset:  # before the image check and the split: other classes play no part
            missing = [c for c in self.class_subset if c not in classes]
            if missing:
                raise DataError(f"data.classes: no label {', '.join(map(repr, missing))} in '{self._table}' "
                                f"(labels there: {', '.join(classes)})")
            classes = list(self.class_subset)
            images = {p: v for p, v in images.items() if v[1] in classes}
        if len(classes) < 2:
            found = f"only one class ('{classes[0]}')" if classes else "no labels"
            raise DataError(f"'{self._table}' has {found}: classification needs at least two classes; check "
                            f"{'data.label_cols' if self.label_cols else 'data.label_col'}")
        index = {c: i for i, c in enumerate(classes)}
        labels: dict[Path, Labels] = {
            p: tuple(int(c in names) for c in classes) if self.multilabel else index[names]
            for p, (_, names, _) in images.items()}
        bad = self._check(list(images))
        samples = sorted((p for p in images if p not in bad), key=str)
        if self.split_col:
            return classes, {s: [(p, labels[p]) for p in samples if images[p][2] == s] for s in SPLITS}
        groups: dict[str, list[Path]] = {}
        counts = [sum(bool(labels[p][i]) for p in samples) for i in range(len(classes))] if self.multilabel else []
        for p in samples:
            y = labels[p]
            if isinstance(y, tuple):  # the rarest positive label; "none" may merge with a class of that name: harmless
                key = min(((counts[i], i) for i, v in enumerate(y) if v), default=None)
                groups.setdefault("none" if key is None else classes[key[1]], []).append(p)
            else:
                groups.setdefault(classes[y], []).append(p)
        if self.kfold:
            split = kfold_split(groups, *self.kfold, self.test_fraction, self.split_seed)
        else:
            split = stratified_split(groups, self.val_fraction, self.test_fraction, self.split_seed)
        check_holdouts({g: len(v) for g, v in groups.items()}, split, self.val_fraction, self.test_fraction)
        return classes, {s: sorted(((p, labels[p]) for p, _ in split[s]), key=lambda x: str(x[0])) for s in SPLITS}

    def _from_split_files(self, rows: dict[str, list[SplitRow]]) -> tuple[list[str], dict[str, list[Any]]]:
        """Multi-label: ``(path, multi-hot)`` of ``path,"i j","a|b"`` rows, the classes by index across the files."""
        if not self.multilabel:
            return super()._from_split_files(rows)
        names: dict[int, tuple[str, str]] = {}  # class index -> (name, where first seen)
        found: dict[str, list[tuple[Path, list[int]]]] = {s: [] for s in SPLITS}
        for split in SPLITS:
            for csv_file, line, row in rows[split]:
                where, label, cls = f"'{csv_file}' line {line}", row["label"] or "", row["class"] or ""
                try:
                    idx = [int(t) for t in label.split()]
                except ValueError:
                    raise DataError(f"{where}: label '{label}' is not class indices separated by spaces: "
                                    "regenerate the split") from None
                cls_names = cls.split("|") if cls else []
                if len(idx) != len(cls_names) or any(i < 0 for i in idx):
                    raise DataError(f"{where}: label '{label}' does not match class '{cls}' (one index per "
                                    "'|'-separated name): regenerate the split")
                for i, name in zip(idx, cls_names):
                    seen = names.setdefault(i, (name, where))
                    if seen[0] != name:
                        raise DataError(f"{where}: class index {i} is '{name}' but '{seen[0]}' at {seen[1]}: "
                                        "regenerate the split")
                path = self.root / row["path"]
                if not path.is_file():
                    raise DataError(f"file '{path}' listed in '{csv_file}' does not exist: "
                                    "fix data.root or data.split_dir")
                found[split].append((path, idx))
        classes = [names[i][0] for i in sorted(names)]
        if sorted(names) != list(range(len(names))) or len(set(classes)) != len(classes):
            raise DataError(f"the split files in '{self.split_dir}' give class indices {sorted(names)} for "
                            f"{classes}: each class needs one index, 0 to N-1; regenerate the split")
        splits = {s: [(p, tuple(int(i in idx) for i in range(len(classes)))) for p, idx in found[s]] for s in SPLITS}
        return classes, self._drop_bad(splits)

    def _finish(self, classes: list[str], splits: dict[str, list[Any]],
                source: str) -> tuple[list[str], dict[str, list[Any]]]:
        if self.split_col and source == "seeded" and not splits["val"]:  # folder's check skips "seeded"
            raise DataError(f"'{self._table}' puts no (readable) image in val (column '{self.split_col}'): "
                            "validation needs at least one; mark some rows val")
        trained = ({i for _, y in splits["train"] for i, v in enumerate(y) if v} if self.multilabel
                   else {y for _, y in splits["train"]})
        if (missing := next((c for i, c in enumerate(classes) if i not in trained), None)) is not None:
            fix = ("regenerate the split" if source == "split_dir" else
                   f"mark one of its images train in column '{self.split_col}'" if self.split_col else
                   "add images of it, or change data.split_seed")
            of = f" of '{self._table}'" if source == "seeded" else ""
            raise DataError(f"class '{missing}'{of} has no {'positive' if self.multilabel else 'image'} in the "
                            f"training split: every class needs one to learn from; {fix}")
        return super()._finish(classes, splits, source)

    # ------------------------------------------------------------------ what a sample is
    def _csv_row(self, sample: tuple[Path, Labels]) -> tuple[str, Any, str]:
        if not self.multilabel:
            return super()._csv_row(sample)  # type: ignore[arg-type]
        path, hot = sample
        on = [i for i, v in enumerate(hot) if v]  # type: ignore[arg-type]
        return csv_path(path, self.root), " ".join(map(str, on)), "|".join(self._classes[i] for i in on)

    def _split_how(self) -> str:
        if self._split_source != "seeded":
            return super()._split_how()
        name = self._table.name if self._table else self.file.name
        if self.split_col:
            how = f"split column '{self.split_col}' of {name}"
            return how + (f", {self.train_per_class} train images per class" if self.train_per_class else "")
        return f"{super()._split_how()}, from {name}"

    def _classes_note(self) -> str:
        return " (multi-label)" if self.multilabel else super()._classes_note()


def _column(name: Any, key: str) -> str:
    """A column-name option as a non-empty string (``data.label_cols=[1,2]`` gives ints)."""
    if isinstance(name, (list, dict, tuple)) or name is None or not str(name).strip():
        raise ConfigError(f"{key}={name}: give a column name of the table")
    return str(name).strip()
