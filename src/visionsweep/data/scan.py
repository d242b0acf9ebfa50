"""Finding images on disk: class folders, pre-split folders, and unreadable files.

Layouts understood (see :class:`visionsweep.data.folder.FolderDataModule`):

* ``root/<class>/<image>``: split afterwards with a seeded, stratified split (:mod:`.splits`);
* ``root/train/<class>/...`` + ``root/{val,valid,validation}/<class>/...`` (+ ``root/test/...``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from visionsweep.data.images import IMAGE_EXTENSIONS, bad_image_message, check_image, is_image_file
from visionsweep.errors import DataError

VAL_DIR_NAMES = ("val", "valid", "validation")


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


def list_images(folder: Path) -> tuple[list[Path], int]:
    """List the image files directly inside ``folder`` (sorted; hidden files skipped).

    Args:
        folder: A class folder.

    Returns:
        The sorted image paths and the number of ignored non-image entries.
    """
    images, ignored = [], 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if _hidden(entry.name):
                continue
            if entry.is_file() and is_image_file(entry.name):
                images.append(Path(entry.path))
            else:
                ignored += 1  # non-image files and nested folders (not searched: direct children only)
    return sorted(images, key=lambda p: p.name), ignored


def class_folders(folder: Path) -> list[Path]:
    """Sorted, non-hidden sub-directories of ``folder``."""
    with os.scandir(folder) as entries:
        dirs = [Path(e.path) for e in entries if e.is_dir() and not _hidden(e.name)]
    return sorted(dirs, key=lambda p: p.name)


def scan_classes(folder: Path, *, allow_empty: bool = False) -> tuple[dict[str, list[Path]], int]:
    """Read ``folder/<class>/<image>`` into ``{class: [paths]}``.

    Args:
        folder: The data root or a split folder (``root/train``).
        allow_empty: Return an empty mapping instead of raising when there are no class folders.

    Returns:
        The per-class image lists (classes sorted) and the number of ignored non-image files.

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
    per_class, ignored = {}, 0
    for d in dirs:
        images, n_ignored = list_images(d)
        ignored += n_ignored
        if not images:
            raise DataError(
                f"class folder '{d}' has no images (looked for {', '.join(IMAGE_EXTENSIONS)}): "
                "add images or remove the folder"
            )
        per_class[d.name] = images
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
