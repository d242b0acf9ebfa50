"""k-fold cross-validation splits: ``data.folds=K data.fold=0..K-1`` as a sweep axis.

The test split is carved out first, exactly as in the plain split (same per-class counts, same
``data.split_seed``), so every fold is scored on the same held-out images; the rest of each class is
dealt into K stratified folds by scikit-learn's ``StratifiedKFold``, and fold k is the validation
set of job k. The validation folds of a sweep are therefore disjoint and cover every non-test image
once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionsweep.errors import ConfigError, DataError
from visionsweep.utils.checks import whole

Sample = tuple[Path, int]


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

    from visionsweep.data.splits import SPLITS, partition

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
