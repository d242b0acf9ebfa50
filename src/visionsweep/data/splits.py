"""Choosing splits: seeded (stratified per class, or over all samples), checks of the result, the
``data.classes`` / ``data.train_per_class`` subsets, k-fold cross-validation, and the class balance of a
split. Split files are :mod:`visionsweep.data.scan`.

Imbalanced classes: counts per split, inverse-frequency loss weights, a weighted sampler.

``data.balance`` picks one remedy: ``none``; ``weights`` (the loss weighs each class by the inverse of
its training frequency: cross-entropy's ``weight``, or BCE's ``pos_weight`` = negatives / positives per
class for multi-label); ``sampler`` (a ``WeightedRandomSampler`` draws each epoch's training samples
with probability inversely proportional to their class's count, with replacement). The sampler draws
from torch's global generator when an epoch starts, in the main process, so the run's seed fixes what
it draws, the worker count changes nothing, and a resume (which restores that generator) draws as the
uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from visionsweep.errors import ConfigError, DataError
from visionsweep.utils.checks import choice, fail, fraction, whole

Sample = tuple[Path, int]
SPLITS = ("train", "val", "test")
T = TypeVar("T")


def validate_fractions(val_fraction: float, test_fraction: float) -> None:
    """Reject split fractions outside ``[0, 1)`` or summing to 1 or more.

    Args:
        val_fraction: Share of each class put into validation.
        test_fraction: Share of each class put into test.

    Raises:
        ConfigError: Naming ``data.val_fraction`` / ``data.test_fraction``.
    """
    for key, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if isinstance(value, str):  # "0.2" would pass the number check, but the split needs a float
            raise fail(key, value, "a number from 0 to 1 (excluded)", 0.2)
        fraction(value, key, 0.2, high_open=True)
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


def partition(items: Sequence[T], val_fraction: float, test_fraction: float,
              rng: np.random.Generator) -> dict[str, list[T]]:
    """Deal ``items`` into train / val / test (:func:`split_counts` of them) with one ``rng`` permutation.

    Args:
        items: What to split (one class's files, or every image/mask pair); each part keeps their order.
        val_fraction: Validation share.
        test_fraction: Test share.
        rng: The split's private generator (one permutation is drawn from it).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.
    """
    n_val, n_test = split_counts(len(items), val_fraction, test_fraction)
    order = rng.permutation(len(items))
    picks = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    return {split: [items[i] for i in sorted(idx)] for split, idx in picks.items()}


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
        for split, part in partition(files, val_fraction, test_fraction, rng).items():
            out[split].extend((f, label) for f in part)
    return out


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
    for split, share, key, minimum in (("val", val_fraction, "data.val_fraction", 2),
                                       ("test", test_fraction, "data.test_fraction", 3)):
        if share > 0 and not splits[split]:
            raise DataError(
                f"{key}={share:g} but the split leaves no {split} images (images per class: {counts}): "
                f"a class needs at least {minimum} images to give one to {split}; add images"
                + (f", or set {key}=0" if split == "test" else "")
            )


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


# k-fold cross-validation (data.folds=K data.fold=0..K-1, a sweep axis): the test split is carved out first,
# exactly as in the plain split (same per-class counts, same data.split_seed), so every fold is scored on the
# same held-out images; the rest of each class is dealt into K stratified folds by scikit-learn's
# StratifiedKFold, and fold k is the validation set of job k: the validation folds are disjoint and cover
# every non-test image once.
def check_fold(folds: int | None, fold: int | None) -> tuple[int, int] | None:
    """``(folds, fold)`` as ints, None when k-fold is off (``folds`` null or 0).

    Args:
        folds: ``data.folds`` (K ≥ 2, or null / 0 for the plain split).
        fold: ``data.fold`` (0..K-1).

    Raises:
        ConfigError: naming ``data.folds`` / ``data.fold``.
    """
    if not folds:
        return None
    k = whole(folds, "data.folds", 2, None, 5, also=" (or null for the plain split)")
    i = whole(0 if fold is None else fold, "data.fold", None, None, 0)
    if not 0 <= i < k:
        raise ConfigError(f"data.fold={fold} is outside 0..{k - 1} for data.folds={k}: give a fold from 0 to "
                          f"{k - 1}, e.g. data.fold=0")
    return k, i


def kfold_split(per_class: dict[str, list[Path]], folds: int, fold: int, test_fraction: float,
                seed: int) -> dict[str, list[Sample]]:
    """Train / val (fold ``fold`` of ``folds``) / test samples, stratified and seeded.

    Args:
        per_class: ``{class: [paths]}``; labels are the index in sorted class order.
        folds: K.
        fold: The validation fold of this job.
        test_fraction: Held-out test share per class (the same images for every fold).
        seed: ``data.split_seed`` (the model seed does not move the folds).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of ``(path, label)``, each sorted by path.

    Raises:
        DataError: a class with fewer non-test images than folds.
    """
    from sklearn.model_selection import StratifiedKFold


    rng = np.random.default_rng(seed)
    out: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    rest: list[Sample] = []
    for label, name in enumerate(sorted(per_class)):
        parts = partition(sorted(per_class[name]), 0.0, test_fraction, rng)  # the plain split's test images
        out["test"].extend((f, label) for f in parts["test"])
        kept = [(f, label) for f in parts["train"]]
        if len(kept) < folds:
            raise DataError(f"class '{name}' has {len(kept)} images outside the test split, fewer than "
                            f"data.folds={folds}: use fewer folds or add images")
        rest.extend(kept)
    labels = np.array([y for _, y in rest])
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_idx, val_idx = list(splitter.split(np.zeros(len(rest)), labels))[fold]
    out["train"] = [rest[i] for i in sorted(train_idx)]
    out["val"] = [rest[i] for i in sorted(val_idx)]
    return {s: sorted(v, key=lambda sample: str(sample[0])) for s, v in out.items()}


BALANCE = ("none", "weights", "sampler")
IMBALANCE_RATIO = 3.0  # beyond this (largest / smallest training class), plain accuracy hides the small ones


def check_balance(value: Any) -> str:
    """``data.balance`` checked (one line naming the choices otherwise)."""
    return str(choice(value if value is not None else "none", "data.balance", BALANCE))


def class_counts(labels: Sequence[Any], num_classes: int) -> list[int]:
    """Samples per class: a class index counts once; a multi-hot tuple counts for each of its classes."""
    counts = [0] * num_classes
    for label in labels:
        if isinstance(label, tuple):
            for c, on in enumerate(label):
                counts[c] += int(bool(on))
        else:
            counts[int(label)] += 1
    return counts


def imbalance(counts: Sequence[int]) -> float:
    """Largest / smallest class count (inf when a class has none; 1.0 for no classes)."""
    if not counts:
        return 1.0
    return max(counts) / min(counts) if min(counts) > 0 else float("inf")


def loss_weights(labels: Sequence[Any], num_classes: int) -> list[float]:
    """Per-class loss weights from the training labels.

    Single-label: ``n / (classes * n_c)`` (1.0 for every class when balanced), as scikit-learn's
    ``class_weight="balanced"``. Multi-label: ``pos_weight`` = negatives / positives of each class.
    """
    counts = class_counts(labels, num_classes)
    n = len(labels)
    if labels and isinstance(labels[0], tuple):
        return [round((n - c) / c, 6) if c else 1.0 for c in counts]
    return [round(n / (num_classes * c), 6) if c else 1.0 for c in counts]


def sample_weights(labels: Sequence[Any], num_classes: int) -> list[float]:
    """Each training sample's draw weight: ``1 / count`` of its class (multi-label: the mean over its
    classes; a sample without labels: ``1 / count`` of such samples)."""
    counts = class_counts(labels, num_classes)
    empty = sum(1 for y in labels if isinstance(y, tuple) and not any(y))
    weights = []
    for y in labels:
        if isinstance(y, tuple):
            on = [c for c, v in enumerate(y) if v]
            weights.append(sum(1.0 / counts[c] for c in on) / len(on) if on else 1.0 / max(empty, 1))
        else:
            weights.append(1.0 / counts[int(y)])
    return weights


def weighted_sampler(labels: Sequence[Any], num_classes: int) -> Any:
    """A ``WeightedRandomSampler`` over the training samples (as many draws as samples, with replacement),
    drawing from torch's global generator (seeded by the run, restored by a resume)."""
    import torch
    from torch.utils.data import WeightedRandomSampler

    weights = torch.as_tensor(sample_weights(labels, num_classes), dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True)


def count_lines(classes: Sequence[str], splits: dict[str, Sequence[Any]], multilabel: bool = False) -> list[str]:
    """One line per non-empty split: its class counts (positives per class for multi-label)."""
    lines = []
    for split, samples in splits.items():
        if not samples:
            continue
        counts = class_counts([y for _, y in samples], len(classes))
        what = "positives per class" if multilabel else "images per class"
        shown = ", ".join(f"{name} {n}" for name, n in list(zip(classes, counts))[:30])
        if len(classes) > 30:  # a long tail of classes: the extremes say what matters
            shown += f", ... ({len(classes) - 30} more; smallest {min(counts)}, largest {max(counts)})"
        lines.append(f"{split} ({len(samples)} images; {what}): {shown}")
    return lines
