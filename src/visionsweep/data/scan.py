"""Which files a data set is made of: images found in class folders or pre-split folders (and the
unreadable ones), or the rows of split files.

Layouts understood (see :class:`visionsweep.data.folder.FolderDataModule`):

* ``root/<class>/<image>``: split afterwards with a seeded, stratified split (:mod:`.splits`);
* ``root/train/<class>/...`` + ``root/{val,valid,validation}/<class>/...`` (+ ``root/test/...``).

Images in sub-folders of a class folder belong to that class (searched recursively, as torchvision's
``ImageFolder`` does; the count is logged). Hidden files and folders (``.name``) are skipped. A file
name that is not valid UTF-8 stops the scan with its path (it could not be written to a split CSV or
a log); an image-named symlink that loops is listed, so the image check reports it like any
unreadable file.

Split files: ``<run>/splits/{train,val,test}.csv``, written by every run and read back by ``data.split_dir``.

One reader and one writer for both data modules. The columns differ (``path,label,class`` for
classification, ``image,mask`` for segmentation); the rules do not: UTF-8 text, paths relative to the
data root with ``/`` separators and never outside it, ``test.csv`` only when there is a test split.
"""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath, PureWindowsPath

from visionsweep.data.images import IMAGE_EXTENSIONS, bad_image_message, check_image, is_image_file
from visionsweep.data.splits import SPLITS
from visionsweep.errors import DataError
from visionsweep.utils.atomic import atomic_write  # <name>.tmp + rename, and the one-line full-disk error

VAL_DIR_NAMES = ("val", "valid", "validation")
log = logging.getLogger(__name__)


def _hidden(name: str) -> bool:
    # ".DS_Store", "._IMG_1.jpg" (macOS resource forks), ".ipynb_checkpoints", ".complete" ...
    return name.startswith(".")


def check_root(root: Path) -> None:
    """Fail with a clear message when the data root is missing or not a folder.

    Args:
        root: The data root.

    Raises:
        DataError: Root missing or a file.
    """
    if not root.exists():
        raise DataError(
            f"data root '{root}' does not exist: set data.root to a folder laid out as "
            "<root>/<class>/<image> (or use a built-in set, e.g. data.builtin=digits)"
        )
    if not root.is_dir():
        raise DataError(
            f"data root '{root}' is not a directory: set data.root to a folder of class sub-folders"
        )


def printable(path: str | Path) -> str:
    """``path`` as printable text: bytes that are not UTF-8 shown as ``\\xff`` escapes."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def check_utf8_name(path: str | Path) -> None:
    """Refuse a file or folder name that is not valid UTF-8 (Python keeps it as lone surrogates).

    Args:
        path: A path found on disk.

    Raises:
        DataError: Naming the path with its undecodable bytes escaped, and the fix.
    """
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"file name '{printable(path)}' is not valid UTF-8: rename it (e.g. convmv -f latin1 -t utf8 "
            "-r --notest <folder>), or move it out of data.root"
        ) from None


def _is(entry: os.DirEntry, kind: str) -> bool | None:
    """``entry.is_file()`` / ``is_dir()``; None for a link that cannot be followed (a loop)."""
    try:
        return entry.is_file() if kind == "file" else entry.is_dir()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise


def list_images(folder: Path, recursive: bool = False) -> tuple[list[Path], int]:
    """List the image files inside ``folder`` (sorted by relative path; hidden entries skipped).

    Args:
        folder: A class folder.
        recursive: Also search sub-folders (symlinked ones too, each real folder once).

    Returns:
        The sorted image paths and the number of ignored entries (non-image files; sub-folders
        when not recursive).

    Raises:
        DataError: A name that is not valid UTF-8.
    """
    images: list[Path] = []
    ignored = 0
    seen: set[str] = set()
    pending = [folder]
    while pending:
        current = pending.pop()
        real = os.path.realpath(current)
        if real in seen:  # a symlink back up the tree: each real folder is searched once
            log.warning("skipped '%s': a link to a folder already searched (%s)", printable(current), real)
            continue
        seen.add(real)
        with os.scandir(current) as entries:
            for entry in entries:
                if _hidden(entry.name):
                    continue
                check_utf8_name(entry.path)
                is_file = _is(entry, "file")
                if is_image_file(entry.name) and is_file is not False:
                    images.append(Path(entry.path))  # a looping link too: the image check names it
                elif recursive and is_file is False and _is(entry, "dir"):
                    pending.append(Path(entry.path))
                else:
                    ignored += 1  # non-image files; nested folders when not recursive
    return sorted(images, key=lambda p: p.relative_to(folder).as_posix()), ignored


def class_folders(folder: Path) -> list[Path]:
    """Sorted, non-hidden sub-directories of ``folder``."""
    with os.scandir(folder) as entries:
        dirs = [Path(e.path) for e in entries if not _hidden(e.name) and _is(e, "dir")]
    for d in dirs:
        check_utf8_name(d)
    return sorted(dirs, key=lambda p: p.name)


def scan_classes(folder: Path, *, allow_empty: bool = False) -> tuple[dict[str, list[Path]], int]:
    """Read ``folder/<class>/<image>`` into ``{class: [paths]}``.

    Args:
        folder: The data root or a split folder (``root/train``).
        allow_empty: Return an empty mapping instead of raising when there are no class folders.

    Returns:
        The per-class image lists (classes sorted; images in sub-folders of a class folder
        included) and the number of ignored non-image files.

    Raises:
        DataError: No class folders, or a class folder without images.
    """
    dirs = class_folders(folder)
    if not dirs:
        if allow_empty:
            return {}, 0
        loose = [p for p in folder.iterdir() if p.is_file() and is_image_file(p.name)]
        hint = (
            f" ({len(loose)} images lie directly in it: move them into one sub-folder per class)"
            if loose else ""
        )
        raise DataError(
            f"no class sub-folders in '{folder}'{hint}: expected <root>/<class>/<image>, "
            "e.g. <root>/cat/1.jpg, <root>/dog/2.jpg; check data.root"
        )
    per_class, ignored, nested = {}, 0, 0
    for d in dirs:
        images, n_ignored = list_images(d, recursive=True)
        ignored += n_ignored
        nested += sum(p.parent != d for p in images)
        if not images:
            raise DataError(
                f"class folder '{d}' has no images (looked for {', '.join(IMAGE_EXTENSIONS)}): "
                "add images or remove the folder"
            )
        per_class[d.name] = images
    if nested:
        log.info("%d images in sub-folders of the class folders of '%s' belong to their class folder's class",
                 nested, folder)
    return per_class, ignored


def require_two_classes(classes: Sequence[str], root: Path) -> None:
    """Classification needs at least two classes.

    Args:
        classes: Class names found.
        root: The folder they were found in (for the message).

    Raises:
        DataError: Fewer than two classes.
    """
    if len(classes) < 2:
        found = f"only one class ('{classes[0]}')" if classes else "no classes"
        raise DataError(
            f"{found} found in '{root}': classification needs at least two class sub-folders; "
            "check data.root"
        )


def find_split_folders(root: Path) -> dict[str, Path] | None:
    """Return ``{"train": ..., "val": ..., ["test": ...]}`` when root is pre-split, else None.

    Args:
        root: The data root.

    Returns:
        The split folders, or None for a plain class-folder layout.
    """
    train = root / "train"
    val = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
    if not train.is_dir() or val is None:
        return None
    found = {"train": train, "val": val}
    if (root / "test").is_dir():
        found["test"] = root / "test"
    return found


def find_bad_images(paths: Sequence[Path], workers: int | None = None) -> dict[Path, str]:
    """Run :func:`check_image` on every path (threads: Pillow releases the GIL while decoding).

    Args:
        paths: Files to check.
        workers: Thread count (default: up to 8, bounded by the CPU count).

    Returns:
        ``{path: reason}`` for the bad files only.
    """
    if not paths:
        return {}
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 64:
        reasons = [check_image(p) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(check_image, paths, chunksize=32))
    return {p: r for p, r in zip(paths, reasons) if r is not None}


def raise_for_bad(bad: dict[Path, str]) -> None:
    """Raise a DataError for the first (sorted) bad file, mentioning how many more there are.

    Args:
        bad: ``{path: reason}`` from :func:`find_bad_images`.

    Raises:
        DataError: When ``bad`` is not empty.
    """
    if not bad:
        return
    first = sorted(bad)[0]
    more = f" [{len(bad) - 1} more bad files]" if len(bad) > 1 else ""
    raise DataError(bad_image_message(first, bad[first]) + more)


SplitRow = tuple[Path, int, dict[str, str]]  # (CSV file, line number, row)


def relative_posix(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators (absolute if outside root)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


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
        atomic_write(folder / f"{split}.csv", buf.getvalue().encode("utf-8"))  # bytes: "\n" on every OS


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
