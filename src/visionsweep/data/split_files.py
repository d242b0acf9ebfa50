"""Split files: ``<run>/splits/{train,val,test}.csv``, written by every run and read back by ``data.split_dir``.

One reader and one writer for both data modules. The columns differ (``path,label,class`` for
classification, ``image,mask`` for segmentation); the rules do not: UTF-8 text, paths relative to the
data root with ``/`` separators and never outside it, ``test.csv`` only when there is a test split.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

from visionsweep.data.splits import SPLITS
from visionsweep.errors import DataError
from visionsweep.utils.atomic import atomic_open  # <name>.tmp + rename, and the one-line full-disk error

SplitRow = tuple[Path, int, dict[str, str]]  # (CSV file, line number, row)


def relative_posix(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators (absolute if outside root)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temp file + rename, so readers never see half a file.

    Args:
        path: Destination (parent folders are created).
        text: Content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", fsync=False, newline="", encoding="utf-8") as fh:
        fh.write(text)


def csv_path(path: Path, root: Path) -> str:
    """``path`` as a split-file cell: relative to ``root``, ``/`` separators.

    Raises:
        DataError: A path that is not valid UTF-8 (cannot be written to the UTF-8 file).
    """
    rel = relative_posix(path, root)
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
        raise DataError(f"file name '{shown}' is not valid UTF-8: rename it, or move it out of data.root") from None
    return rel


def write_split_files(folder: Path, header: Sequence[str], rows: dict[str, Iterable[Sequence]]) -> None:
    """Write ``folder/<split>.csv`` for every split (``test.csv`` only when it has rows), atomically.

    Args:
        folder: The run's ``splits/`` folder.
        header: Column names.
        rows: ``{split: rows}``, each row a sequence of cells (paths from :func:`csv_path`).
    """
    for split in SPLITS:
        lines = list(rows.get(split, ()))
        if split == "test" and not lines:
            continue
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(lines)
        atomic_write_text(folder / f"{split}.csv", buf.getvalue())


def inside_root(rel: str, csv_file: Path, line: int, column: str = "path") -> str:
    """Refuse a split-file path that leaves the data root (absolute, ``..``, a drive letter).

    A split file lists paths relative to ``data.root``; one that points elsewhere would train on
    files the data root does not hold (and ``skip_bad_images`` would not notice).

    Args:
        rel: The path as written in the CSV.
        csv_file: The CSV file (for the message).
        line: Its line number.
        column: The CSV column (``path``, ``image``, ``mask``).

    Returns:
        ``rel`` unchanged.

    Raises:
        DataError: Naming the file, line and path.
    """
    if not rel:
        raise DataError(f"'{csv_file}' line {line}: the {column} column is empty: fix the row or regenerate the split")
    pure = PurePosixPath(rel.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or PureWindowsPath(rel).drive:
        raise DataError(
            f"'{csv_file}' line {line}: {column} '{rel}' is outside data.root: split files list paths "
            "relative to data.root (no absolute paths, no '..'); fix the row or regenerate the split"
        )
    return rel


def read_csv_rows(csv_file: Path, header: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a UTF-8 split CSV that has at least the columns ``header``.

    Raises:
        DataError: Not UTF-8 text, or a missing column.
    """
    try:
        with csv_file.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not set(header) <= set(reader.fieldnames):
                raise DataError(f"split file '{csv_file}' must have the header {','.join(header)}")
            return [(line, row) for line, row in enumerate(reader, start=2)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"split file '{csv_file}' is not a UTF-8 CSV file ({type(e).__name__}): "
                        "regenerate the split (a run writes it to <run>/splits/)") from None


def read_split_files(split_dir: Path, header: Sequence[str], path_columns: Sequence[str]) -> dict[str, list[SplitRow]]:
    """The rows of ``split_dir/{train,val,test}.csv`` (``test.csv`` optional), path columns checked.

    Args:
        split_dir: Folder with the CSV files (a previous run's ``splits/``).
        header: Columns every file must have.
        path_columns: Columns holding paths relative to the data root (see :func:`inside_root`).

    Returns:
        ``{split: [(csv file, line, row)]}``; path cells checked, still relative to the data root.

    Raises:
        DataError: Not a folder, a missing ``train.csv`` / ``val.csv``, not UTF-8 CSV, a missing column,
            an empty path or one outside the data root.
    """
    if not split_dir.is_dir():
        raise DataError(
            f"split_dir '{split_dir}' is not a folder: point data.split_dir at a run's splits/ folder"
        )
    out: dict[str, list[SplitRow]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        csv_file = split_dir / f"{split}.csv"
        if not csv_file.is_file():
            if split == "test":
                continue
            raise DataError(f"split file '{csv_file}' is missing: data.split_dir needs train.csv and val.csv")
        for line, row in read_csv_rows(csv_file, header):
            for column in path_columns:
                row[column] = inside_root(row[column] or "", csv_file, line, column)
            out[split].append((csv_file, line, row))
    return out
