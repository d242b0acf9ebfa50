"""Error analysis of a checkpoint on its run's val or test split.

Confusion matrix (counts and row-normalised), per-class precision / recall / F1, the most confused
pairs and a gallery of the highest-loss images. The split is the training run's own (its
``splits/*.csv``), built exactly as ``visionsweep.eval`` builds it. Segmentation checkpoints: the same
over pixels, plus IoU (``segerrors.py``). Multi-label checkpoints: a 2 x 2 confusion per class at the tuned
thresholds, per-class AP, and the surest false positives / negatives (``multierrors.py``).
"""

from __future__ import annotations

import csv
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from visionsweep.analysis import plots
from visionsweep.analysis.common import load_checkpoint, run_datamodule
from visionsweep.errors import ConfigError
from visionsweep.utils.atomic import atomic_open
from visionsweep.utils.text import csv_cell, plain

log = logging.getLogger(__name__)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """``cm[i, j]`` = number of images (or pixels) of class ``i`` predicted as ``j``, over classes ``0..n-1``."""
    from sklearn import metrics  # here: importing scikit-learn takes ~0.9 s, and `see` imports every mode

    return metrics.confusion_matrix(y_true, y_pred, labels=np.arange(n))


def matrix_cells(cm: np.ndarray) -> dict[str, np.ndarray]:
    """A confusion matrix as scikit-learn's weighted ``(y_true, y_pred)`` pairs, one per cell.

    A pixel confusion matrix is summed batch by batch; its metrics then come from these ``n * n``
    weighted pairs instead of a label array per pixel.
    """
    n = len(cm)
    actual, predicted = np.divmod(np.arange(n * n), n)
    return {"y_true": actual, "y_pred": predicted, "labels": np.arange(n), "sample_weight": np.ravel(cm)}


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    from sklearn import metrics

    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        **matrix_cells(cm), average=None, zero_division=0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(int)}


def most_confused(cm: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` largest off-diagonal cells as ``{"actual", "predicted", "count"}``, largest first."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    pairs = [np.unravel_index(i, cm.shape) for i in order]
    return [{"actual": classes[i], "predicted": classes[j], "count": int(off[i, j])}
            for i, j in pairs if off[i, j] > 0]


@torch.no_grad()
def predict(model: Any, loader: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities (N, C), labels (N,) and per-image cross-entropy (N,) over a loader, in order (the
    checkpoint's temperature applied to both)."""
    probs, labels, losses = [], [], []
    t = getattr(model, "temperature", 1.0)
    for x, y in loader:
        logits = model(x) / t
        probs.append(logits.softmax(1))
        labels.append(y)
        losses.append(F.cross_entropy(logits, y, reduction="none"))
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), torch.cat(losses).numpy()


def confusion_figure(cm: np.ndarray, classes: list[str], index: plots.Index) -> None:
    """Save ``confusion.png``: the matrix as counts and normalised per actual class."""
    n = len(classes)
    panel = max(3.0, 0.45 * n)
    fig, axes = plots.grid(1, 2, panel=panel)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.16, wspace=0.3)  # room for class names
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    for ax, data, title, fmt in ((axes[0, 0], cm, "counts (rows: actual)", "d"),
                                 (axes[0, 1], norm, "normalised per actual class", ".2f")):
        ax.imshow(data, cmap="Blues", vmin=0, vmax=data.max() or 1)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("actual", fontsize=7)
        if n <= 20:  # names and numbers only while they stay readable
            ticks = range(n)
            ax.set_xticks(ticks, [plain(c[:8]) for c in classes], fontsize=6, rotation=90)
            ax.set_yticks(ticks, [plain(c[:8]) for c in classes], fontsize=6)
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=6,
                            color="white" if data[i, j] > 0.6 * (data.max() or 1) else "black")
    index.save(fig, "confusion", "confusion matrix: counts | normalised")


def table_figure(stats: dict[str, np.ndarray], classes: list[str], index: plots.Index) -> None:
    """Save ``per_class.png``: precision / recall / F1 / support per class and their macro average."""
    rows = [[plain(c), f"{p:.3f}", f"{r:.3f}", f"{f:.3f}", str(s)] for c, p, r, f, s in
            zip(classes, stats["precision"], stats["recall"], stats["f1"], stats["support"])]
    rows.append(["macro avg", *(f"{stats[k].mean():.3f}" for k in ("precision", "recall", "f1")),
                 str(int(stats["support"].sum()))])
    fig, axes = plots.grid(1, 1, panel=5.0, aspect=max(0.3, 0.06 * (len(rows) + 2)))
    ax = axes[0, 0]
    ax.axis("off")
    ax.table(cellText=rows, colLabels=["class", "precision", "recall", "F1", "support"], loc="center")
    ax.set_title("per-class precision / recall / F1", fontsize=8)
    index.save(fig, "per_class", "per-class precision / recall / F1 table")


def _top_losses_figure(dataset: Any, probs: np.ndarray, labels: np.ndarray, losses: np.ndarray,
                       classes: list[str], k: int, index: plots.Index) -> tuple[list[dict[str, Any]], Any]:
    """A gallery of the ``k`` highest-loss images; returns their records and the (saved) figure."""
    order = np.argsort(-losses, kind="stable")[:k]
    cols = min(4, len(order))
    rows = math.ceil(len(order) / cols)
    fig, axes = plots.grid(rows, cols, panel=2.2)
    gallery = []
    for n, ax in enumerate(axes.flat):
        if n >= len(order):
            ax.axis("off")
            continue
        i = int(order[n])
        image, _ = dataset[i]
        pred = int(probs[i].argmax())
        plots.show(ax, image.numpy().transpose(1, 2, 0),
                   top_loss_title(classes[pred], classes[int(labels[i])], float(losses[i]),
                                  float(probs[i, pred])))
        gallery.append({"file": str(dataset.samples[i][0]), "predicted": classes[pred],
                        "actual": classes[int(labels[i])], "loss": round(float(losses[i]), 4),
                        "prob": round(float(probs[i, pred]), 4)})
    index.save(fig, "top_losses", f"top {len(order)} losses (title: pred / actual / loss, p(pred))")
    return gallery, fig


def reliability_figure(model: Any, probs: np.ndarray, labels: np.ndarray, losses: np.ndarray, split: str,
                       index: plots.Index) -> dict[str, Any]:
    """Save ``reliability.png`` (the report's diagram of these probabilities); returns ECE, NLL, Brier and T."""
    from visionsweep.models import calibration as cal
    from visionsweep.report.calibration import draw_reliability, ece

    p, y = torch.from_numpy(probs).double(), torch.from_numpy(labels).long()
    bins = {"split": split, **cal.reliability(p, y)}
    t = float(getattr(model, "temperature", 1.0))
    out = {"temperature": round(t, 6), "ece": round(ece(bins), 6),
           "nll": round(float(losses.mean()), 6), "brier": round(float(cal.brier(p, y).mean()), 6)}
    fig, axes = plots.grid(1, 1, panel=5.0)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.1)  # room for the axes' numbers and names
    draw_reliability(axes[0, 0], f"{split} split, temperature {t:.3g}", bins)
    index.save(fig, "reliability",
               f"reliability diagram ({split}): accuracy per confidence bin, ECE {out['ece']:.4f}")
    return out


def top_loss_title(pred: str, actual: str, loss: float, prob: float) -> str:
    """``pred <p> / actual <a> / loss <l>`` (then p(pred)) over a top-losses cell, broken where it is too wide."""
    head, tail = f"pred {pred[:10]} / actual {actual[:10]}", f"loss {loss:.2f}"
    if len(head) + len(tail) <= 27:  # ~30 characters fit a 2.2-inch cell at 8 pt
        return plain(f"{head} / {tail}\np(pred) {prob:.2f}")
    return plain(f"{head} /\n{tail}, p(pred) {prob:.2f}")


def run(cfg: DictConfig, index: plots.Index) -> None:
    """``see=errors``: confusion, per-class table, most-confused pairs and top losses on a split
    (of pixels for a segmentation checkpoint; per class and at the tuned thresholds for a multi-label one)."""
    ck = load_checkpoint(cfg)
    dm = run_datamodule(ck, cfg)
    split = str(cfg.get("split") or "val")
    if split not in ("val", "test"):
        raise ConfigError(f"split={split}: use val or test")
    if split == "test" and not dm.has_test:
        index.note("no test split in this data set: analysed the val split")
        split = "val"
    if cfg.see.get("batch_size"):
        dm.batch_size = int(cfg.see.batch_size)
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    if ck.segment:  # pixels instead of images: analysis/segerrors.py
        from visionsweep.analysis import segerrors

        return segerrors.run(ck, loader, cfg, split, index)
    if getattr(ck.model, "multilabel", False):  # a yes/no question per class: analysis/multierrors.py
        from visionsweep.analysis import multierrors

        return multierrors.run(ck, loader, cfg, split, index)
    probs, labels, losses = predict(ck.model, loader)
    classes = ck.classes
    cm = confusion_matrix(labels, probs.argmax(1), len(classes))
    stats = per_class(cm)
    confusion_figure(cm, classes, index)
    table_figure(stats, classes, index)
    calibration = reliability_figure(ck.model, probs, labels, losses, split, index)
    gallery, _ = _top_losses_figure(loader.dataset, probs, labels, losses, classes,
                                 int(cfg.see.get("top_k") or 16), index)
    pairs = most_confused(cm, classes, int(cfg.see.get("pairs") or 10))
    with atomic_open(index.out_dir / "per_class.csv", "w", fsync=False, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for c, p, r, f, s in zip(classes, *(stats[k] for k in ("precision", "recall", "f1", "support"))):
            writer.writerow([csv_cell(c), f"{p:.6f}", f"{r:.6f}", f"{f:.6f}", int(s)])
    for pair in pairs:
        index.note(f"confused: {pair['count']} x {pair['actual']} predicted as {pair['predicted']}")
    acc = float(np.trace(cm) / max(cm.sum(), 1))
    index.data.update(checkpoint=str(ck.path), split=split, n_images=int(cm.sum()), accuracy=round(acc, 6),
                      classes=classes, confusion_matrix=cm.tolist(),
                      per_class={c: {k: (int(stats[k][i]) if k == "support" else round(float(stats[k][i]), 6))
                                     for k in stats} for i, c in enumerate(classes)},
                      most_confused=pairs, top_losses=gallery, calibration=calibration)
    print(f"{split}: {int(cm.sum())} images, acc={acc:.4f}", flush=True)
