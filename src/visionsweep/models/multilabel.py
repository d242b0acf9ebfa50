"""Multi-label classification (``task=multilabel``): the loss, decision thresholds tuned for F1, metrics.

Each class is a yes/no question answered by its own sigmoid. A probability of 0.5 is a poor cut for a
rare class (the model seldom dares to say yes), so each class gets the threshold that maximises its F1
on the validation split, tuned after every validation epoch and kept in the model's state (a buffer):
the checkpoint of the best epoch carries the thresholds of that epoch, and predict, TTA, export and the
test metrics use them. Threshold-free mAP (macro average precision) is the metric checkpoints and
sweeps compare by (``val/map``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multilabel_average_precision

from visionsweep.errors import ConfigError

LOSSES = ("bce", "asl")


def check_loss(loss: str | None, multilabel: bool) -> str:
    """``model.loss``: null gives cross-entropy (``ce``) or, multi-label, ``bce``; ``asl`` is multi-label only."""
    if loss is None:
        return "bce" if multilabel else "ce"
    name = str(loss).strip().lower()
    allowed = LOSSES if multilabel else ("ce",)
    if name not in allowed:
        extra = "" if multilabel else " (bce and asl need task=multilabel)"
        raise ConfigError(f"model.loss={loss}: choose one of {', '.join(allowed)} or null{extra}")
    return name


def multilabel_loss(kind: str, logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0,
                    pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss of a batch: BCE with logits (targets smoothed towards 0.5, ``pos_weight`` per class), or
    timm's asymmetric loss (ASL, Ridnik et al. 2021), averaged over the batch."""
    if kind == "asl":
        import inspect

        from timm.loss import AsymmetricLossMultiLabel

        loss = AsymmetricLossMultiLabel()(logits, targets)
        # timm >= 1.0.2x averages over the batch ("batchmean", its default); earlier releases return the sum
        batch_mean = "reduction" in inspect.signature(AsymmetricLossMultiLabel.__init__).parameters
        return loss if batch_mean else loss / max(1, len(logits))
    if smoothing:
        targets = targets * (1.0 - smoothing) + 0.5 * smoothing
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)


def tune_thresholds(probs: torch.Tensor, targets: torch.Tensor, default: float = 0.5) -> torch.Tensor:
    """Per-class thresholds maximising F1 (a sample is positive when its probability is >= the threshold).

    For each class the candidate cuts lie between consecutive distinct probabilities (sorted high to low);
    the chosen threshold is the midpoint of the best cut, so it generalises no worse at either side.
    A class without positives in ``targets`` keeps ``default``.

    Args:
        probs: ``N x C`` probabilities.
        targets: ``N x C`` 0/1 labels.
        default: The threshold of a class that cannot be tuned.

    Returns:
        ``C`` thresholds (float32).
    """
    n, num = probs.shape
    out = torch.full((num,), float(default))
    for c in range(num):
        t = targets[:, c].float()
        positives = float(t.sum())
        if positives == 0 or n == 0:
            continue
        p, order = probs[:, c].float().sort(descending=True)
        tp = t[order].cumsum(0)
        k = torch.arange(1, n + 1, dtype=torch.float32)
        f1 = 2 * tp / (k + positives)
        distinct = torch.ones(n, dtype=torch.bool)
        distinct[:-1] = p[:-1] != p[1:]  # a cut inside a run of equal probabilities cannot be made
        f1[~distinct] = -1.0
        best = int(f1.argmax())
        out[c] = (p[best] + p[best + 1]) / 2 if best + 1 < n else p[best]
    return out


def f1_scores(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor | float) -> tuple[list[float], float]:
    """Per-class F1 and micro F1 of the decisions ``probs >= thresholds`` (a class with neither positives nor
    positive decisions scores 1.0: nothing to find, nothing wrongly found)."""
    pred = probs >= (thresholds if isinstance(thresholds, torch.Tensor) else torch.tensor(float(thresholds)))
    t = targets.bool()
    tp = (pred & t).sum(0).float()
    fp = (pred & ~t).sum(0).float()
    fn = (~pred & t).sum(0).float()
    denom = 2 * tp + fp + fn
    per_class = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.ones_like(tp))
    micro = float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1))
    return per_class.tolist(), micro


def final_scores(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor,
                class_names: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
    """The test metrics (``test/map``, ``test/f1_macro``, ``test/f1_micro`` at the tuned thresholds,
    ``test/f1_macro_05`` at 0.5) and the test report (per-class AP, F1, threshold, support; one 2 x 2
    confusion ``[[tn, fp], [fn, tp]]`` per class)."""
    targets_int = targets.round().int()
    ap = multilabel_average_precision(probs, targets_int, num_labels=len(class_names), average=None)
    ap = [float(v) if torch.isfinite(v) else float("nan") for v in ap]
    scored = [v for v, s in zip(ap, targets_int.sum(0).tolist()) if s > 0]  # AP needs a positive to find
    f1, micro = f1_scores(probs, targets_int, thresholds)
    f1_half, _ = f1_scores(probs, targets_int, 0.5)
    pred = probs >= thresholds
    t = targets_int.bool()
    per_class = {}
    for c, name in enumerate(class_names):
        p, y = pred[:, c], t[:, c]
        confusion = [[int((~p & ~y).sum()), int((p & ~y).sum())], [int((~p & y).sum()), int((p & y).sum())]]
        per_class[name] = {"ap": ap[c], "f1": f1[c], "f1_at_0.5": f1_half[c], "threshold": float(thresholds[c]),
                           "support": int(y.sum()), "confusion": confusion}
    metrics = {"test/map": sum(scored) / len(scored) if scored else float("nan"),
               "test/f1_macro": sum(f1) / len(f1), "test/f1_micro": micro,
               "test/f1_macro_05": sum(f1_half) / len(f1_half)}
    return metrics, {"per_class": per_class, "thresholds": [float(v) for v in thresholds]}


def baselines(train_labels: list[tuple[int, ...]], eval_labels: list[tuple[int, ...]]) -> dict[str, dict[str, float]]:
    """mAP and macro-F1 on ``eval_labels`` of two models that never look at the image: ``all_negative``
    (every class absent) and ``always_frequent`` (each class present with its training frequency as the
    probability, so present everywhere when that is >= 0.5). A model must beat both to have learnt anything;
    constant scores rank nothing, so both score each class's prevalence in mAP."""
    train = torch.tensor(train_labels, dtype=torch.float32)
    target = torch.tensor(eval_labels, dtype=torch.float32)
    found = target.sum(0) > 0  # AP needs a positive to find
    out = {}
    for name, probs in (("all_negative", torch.zeros_like(target)),
                        ("always_frequent", train.mean(0).expand_as(target).contiguous())):
        ap = multilabel_average_precision(probs, target.int(), num_labels=target.shape[1], average=None)
        f1, _ = f1_scores(probs, target, 0.5)
        out[name] = {"map": round(float(ap[found].mean()), 6) if bool(found.any()) else float("nan"),
                     "f1_macro": round(sum(f1) / len(f1), 6)}
    return out
