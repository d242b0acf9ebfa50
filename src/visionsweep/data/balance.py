"""Imbalanced classes: counts per split, inverse-frequency loss weights, a weighted sampler.

``data.balance`` picks one remedy: ``none``; ``weights`` (the loss weighs each class by the inverse of
its training frequency: cross-entropy's ``weight``, or BCE's ``pos_weight`` = negatives / positives per
class for multi-label); ``sampler`` (a ``WeightedRandomSampler`` draws each epoch's training samples
with probability inversely proportional to their class's count, with replacement). The sampler draws
from torch's global generator when an epoch starts, in the main process, so the run's seed fixes what
it draws, the worker count changes nothing, and a resume (which restores that generator) draws as the
uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from visionsweep.utils.checks import choice

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
