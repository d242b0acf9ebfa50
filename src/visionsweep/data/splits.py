"""Splitting samples (seeded, stratified) and reading/writing split CSV files.

``<run>/splits/{train,val,test}.csv`` (header ``path,label,class``, paths relative to the data root)
lets a later run re-use exactly the same split via ``data.split_dir``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from visionsweep.errors import ConfigError, DataError

Sample = tuple[Path, int]
SPLITS = ("train", "val", "test")
CSV_HEADER = ("path", "label", "class")


def validate_fractions(val_fraction: float, test_fraction: float) -> None:
    """Reject split fractions outside ``[0, 1)`` or summing to 1 or more.

    Args:
        val_fraction: Share of each class put into validation.
        test_fraction: Share of each class put into test.

    Raises:
        ConfigError: Naming ``data.val_fraction`` / ``data.test_fraction``.
    """
    for key, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"{key}={value} is outside [0, 1): use e.g. {key}=0.2")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction:g} >= 1 leaves no "
            "training images: lower one of them"
        )


def _n_take(n: int, fraction: float) -> int:
    # Round half up (Python's round() is banker's rounding, surprising for 2.5 -> 2).
    return int(math.floor(n * fraction + 0.5))


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of ``n`` images of one class go to val and test.

    Rounds per class, keeps at least one training image, and gives a small class (``n >= 2``)
    one validation image when ``val_fraction > 0`` (likewise one test image when ``n >= 3``).

    Args:
        n: Images in the class.
        val_fraction: Validation share.
        test_fraction: Test share.

    Returns:
        ``(n_val, n_test)``.
    """
    n_val, n_test = _n_take(n, val_fraction), _n_take(n, test_fraction)
    if val_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    if test_fraction > 0 and n_test == 0 and n >= 3:
        n_test = 1
    while n_val + n_test > n - 1:  # keep >= 1 training image; shrink the larger holdout first
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def stratified_split(
    per_class: dict[str, list[Path]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Sample]]:
    """Seeded per-class split; depends only on the file lists and ``seed``.

    Args:
        per_class: ``{class: [paths]}``; labels are the index in sorted class order.
        val_fraction: Validation share per class.
        test_fraction: Test share per class.
        seed: Split seed (a private generator: the global numpy/torch state is untouched).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of ``(path, label)``, each sorted by path.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for label, name in enumerate(sorted(per_class)):
        files = sorted(per_class[name])  # sort again: never trust filesystem order
        n_val, n_test = split_counts(len(files), val_fraction, test_fraction)
        order = rng.permutation(len(files))
        picks = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        for split, idx in picks.items():
            out[split].extend((files[i], label) for i in sorted(idx))
    return out


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def split_csv_text(samples: Iterable[Sample], root: Path, classes: Sequence[str]) -> str:
    """Render samples as ``path,label,class`` CSV text (paths relative to root).

    Raises:
        DataError: A path that is not valid UTF-8 (cannot be written to the UTF-8 file).
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for path, label in samples:
        rel = relative_posix(path, root)
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
            raise DataError(f"file name '{shown}' is not valid UTF-8: rename it, or move it out of data.root") from None
        writer.writerow((rel, label, classes[label]))
    return buf.getvalue()


def inside_root(rel: str, csv_path: Path, line: int, column: str = "path") -> str:
    """Refuse a split-file path that leaves the data root (absolute, ``..``, a drive letter).

    A split file lists paths relative to ``data.root``; one that points elsewhere would train on
    files the data root does not hold (and ``skip_bad_images`` would not notice).

    Args:
        rel: The path as written in the CSV.
        csv_path: The CSV file (for the message).
        line: Its line number.
        column: The CSV column (``path``, ``image``, ``mask``).

    Returns:
        ``rel`` unchanged.

    Raises:
        DataError: Naming the file, line and path.
    """
    if not rel:
        raise DataError(f"'{csv_path}' line {line}: the {column} column is empty: fix the row or regenerate the split")
    pure = PurePosixPath(rel.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or PureWindowsPath(rel).drive:
        raise DataError(
            f"'{csv_path}' line {line}: {column} '{rel}' is outside data.root: split files list paths "
            "relative to data.root (no absolute paths, no '..'); fix the row or regenerate the split"
        )
    return rel


def check_holdouts(per_class: dict[str, int], splits: dict[str, list], val_fraction: float,
                   test_fraction: float) -> None:
    """Refuse a seeded split that leaves validation (or test, when asked for) without images.

    Args:
        per_class: Images per class.
        splits: The split's sample lists.
        val_fraction: ``data.val_fraction``.
        test_fraction: ``data.test_fraction``.

    Raises:
        DataError: Naming the class counts and the minimum a class needs.
    """
    counts = ", ".join(f"{c}: {n}" for c, n in sorted(per_class.items()))
    for split, fraction, key, minimum in (("val", val_fraction, "data.val_fraction", 2),
                                          ("test", test_fraction, "data.test_fraction", 3)):
        if fraction > 0 and not splits[split]:
            raise DataError(
                f"{key}={fraction:g} but the split leaves no {split} images (images per class: {counts}): "
                f"a class needs at least {minimum} images to give one to {split}; add images"
                + (f", or set {key}=0" if split == "test" else "")
            )


def read_csv_rows(csv_path: Path, header: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a UTF-8 split CSV that has at least the columns ``header``.

    Raises:
        DataError: Not UTF-8 text, or a missing column.
    """
    try:
        with csv_path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not set(header) <= set(reader.fieldnames):
                raise DataError(f"split file '{csv_path}' must have the header {','.join(header)}")
            return [(line, row) for line, row in enumerate(reader, start=2)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"split file '{csv_path}' is not a UTF-8 CSV file ({type(e).__name__}): "
                        "regenerate the split (a run writes it to <run>/splits/)") from None


def read_split_dir(split_dir: Path, root: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    """Read ``split_dir/{train,val,test}.csv`` written by a previous run.

    Classes are the sorted class names of ``train.csv``; the label column must agree with them.

    Args:
        split_dir: Folder with the CSV files (``test.csv`` optional).
        root: Data root the CSV paths are relative to.

    Returns:
        The classes and ``{"train", "val", "test"}`` sample lists.

    Raises:
        DataError: Missing CSV, malformed row, unknown class or a listed file that does not exist.
    """
    if not split_dir.is_dir():
        raise DataError(
            f"split_dir '{split_dir}' is not a folder: point data.split_dir at a run's splits/ folder"
        )
    rows: dict[str, list[tuple[str, int, str, Path]]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        csv_path = split_dir / f"{split}.csv"
        if not csv_path.is_file():
            if split == "test":
                continue
            raise DataError(f"split file '{csv_path}' is missing: data.split_dir needs train.csv and val.csv")
        for line, row in read_csv_rows(csv_path, CSV_HEADER):
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise DataError(f"'{csv_path}' line {line}: label '{row['label']}' is not an integer") from None
            rows[split].append((inside_root(row["path"] or "", csv_path, line), label, row["class"], csv_path))
    classes = sorted({cls for _, _, cls, _ in rows["train"]})
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        for rel, label, cls, csv_path in rows[split]:
            if cls not in index:
                raise DataError(
                    f"class '{cls}' in '{csv_path}' does not occur in train.csv: "
                    "fix or regenerate the split"
                )
            if index[cls] != label:
                raise DataError(
                    f"'{csv_path}': label {label} for class '{cls}' disagrees with train.csv "
                    f"(expected {index[cls]}): regenerate the split"
                )
            path = root / rel
            if not path.is_file():
                raise DataError(
                    f"file '{path}' listed in '{csv_path}' does not exist: "
                    "fix data.root or data.split_dir"
                )
            out[split].append((path, label))
    return classes, out


def check_class_subset(classes: Sequence[str | int] | str | None) -> list[str] | None:
    """``data.classes`` as a sorted list of folder names, None to keep every class.

    Args:
        classes: Class folder names to keep (``[7,8,9]`` from the command line gives ints).

    Raises:
        ConfigError: Not a list, an empty name, a repeated name, or fewer than two names.
    """
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise ConfigError(f"data.classes={classes}: give a list of class folder names, e.g. data.classes=[7,8,9]")
    names = [str(c) for c in classes]
    if any(not n or isinstance(c, (list, dict, float)) for n, c in zip(names, classes)):
        raise ConfigError(f"data.classes={list(classes)}: each entry must be a class folder name, e.g. [7,8,9]")
    if len(set(names)) != len(names):
        raise ConfigError(f"data.classes={names} names a class twice: list each class folder once")
    if len(names) < 2:
        raise ConfigError(f"data.classes={names}: classification needs at least two classes")
    return sorted(names)


def check_train_per_class(n: int | None) -> int | None:
    """``data.train_per_class`` as an int ≥ 1, None to keep every training image.

    Raises:
        ConfigError: Not a whole number ≥ 1.
    """
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"data.train_per_class={n}: give a whole number >= 1 (images kept per class), or null")
    return n


def select_classes(classes: Sequence[str], splits: dict[str, list[Sample]], wanted: Sequence[str],
                   where: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    """Keep the samples of the ``wanted`` classes, relabelled by their sorted order.

    Args:
        classes: All class names (label ``i`` is ``classes[i]``).
        splits: Sample lists of every split.
        wanted: Class names to keep (``data.classes``).
        where: The data root or split folder (for the message).

    Raises:
        DataError: A wanted class that is not among ``classes``.
    """
    missing = [c for c in wanted if c not in classes]
    if missing:
        raise DataError(f"data.classes: no class folder {', '.join(repr(c) for c in missing)} in '{where}' "
                        f"(classes there: {', '.join(classes)})")
    new = {classes.index(c): i for i, c in enumerate(sorted(wanted))}
    return sorted(wanted), {s: [(p, new[y]) for p, y in v if y in new] for s, v in splits.items()}


def keep_per_class(samples: list[Sample], n: int, seed: int, class_names: Sequence[str]) -> list[Sample]:
    """``n`` samples of each label, drawn with ``seed`` (a private generator), sorted by path.

    Only the training split is thinned: the same ``seed`` (``data.split_seed``) keeps the same images
    whatever the model seed, which is what pairs the arms of a comparison over seeds.

    Args:
        samples: ``(path, label)`` of one split.
        n: Samples kept per label.
        seed: The split seed.
        class_names: For the message.

    Raises:
        DataError: A class with fewer than ``n`` samples.
    """
    rng = np.random.default_rng([seed, 1])  # its own stream: the split's draws are unchanged
    by_label: dict[int, list[Sample]] = {}
    for sample in sorted(samples, key=lambda s: str(s[0])):
        by_label.setdefault(sample[1], []).append(sample)
    short = {class_names[y]: len(v) for y, v in sorted(by_label.items()) if len(v) < n}
    if short:
        counts = ", ".join(f"{c}: {k}" for c, k in short.items())
        raise DataError(f"data.train_per_class={n} but the training split has fewer images ({counts}): "
                        "lower data.train_per_class or data.val_fraction / data.test_fraction")
    kept = [s for _, v in sorted(by_label.items()) for i in sorted(rng.permutation(len(v))[:n]) for s in [v[i]]]
    return sorted(kept, key=lambda s: str(s[0]))


def fingerprint_files(paths: Iterable[Path], root: Path) -> dict[str, Any]:
    """Identify the exact files a run used (cheap: one ``stat`` per file, contents not read).

    Args:
        paths: Every file of every split (images, and masks for segmentation).
        root: The data root the fingerprint's paths are relative to.

    Returns:
        ``{"n_files": int, "sha256": hex digest of the sorted (relative path, size) list}``.

    Raises:
        DataError: A file that disappeared or cannot be read since the scan.
    """
    import hashlib

    from visionsweep.data.images import bad_image_message

    entries = []
    for path in paths:
        try:
            entries.append((relative_posix(path, root), path.stat().st_size))
        except FileNotFoundError:
            raise DataError(f"image '{path}' disappeared after the data set was scanned: restore it or re-run") from None
        except OSError as e:  # a symlink loop with data.verify_images=false, ...
            raise DataError(bad_image_message(path, f"{type(e).__name__}: {e.strerror or e}")) from None
    digest = hashlib.sha256("".join(f"{rel}\t{size}\n" for rel, size in sorted(entries)).encode())
    return {"n_files": len(entries), "sha256": digest.hexdigest()}
