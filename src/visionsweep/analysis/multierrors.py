"""``see=errors`` for a multi-label checkpoint (``task=multilabel``): each class is its own yes/no question.

At the per-class thresholds tuned on validation and kept in the checkpoint (``model.thresholds``, the
decisions ``probs >= thresholds`` that predict and test use):

* ``confusion.png``: one exact 2 x 2 matrix per class (rows: actual no / yes, columns: predicted no / yes),
  counted over the images of the split, so each sums to the number of images (not fastai's multi-label
  confusion matrix, which mixes classes: fastai#3257);
* ``per_class.png`` / ``per_class.csv``: precision, recall, F1 at the threshold, average precision (AP,
  threshold-free), the threshold, the support and the four cells;
* ``false_positives.png`` / ``false_negatives.png``: the surest mistakes: negatives with the highest
  probability that crossed the threshold, positives with the lowest that did not; up to ``see.top_k`` images
  a gallery, taken from every class in turn, each titled with the class, its probability and the image's
  true labels.

The metrics are those of :func:`visionsweep.models.multilabel.final_scores` (the training run's test
report): on ``split=test`` they equal the run's ``test_report``.
"""

from __future__ import annotations

import csv
import math
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from visionsweep.analysis import plots
from visionsweep.models import multilabel as ml
from visionsweep.utils.atomic import atomic_open
from visionsweep.utils.text import csv_cell, plain

STATS = ("precision", "recall", "f1", "ap", "threshold", "support")


@torch.no_grad()
def predict(model: Any, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (``N x C`` float32, one sigmoid per class) and 0/1 targets (``N x C`` int) in loader order."""
    probs, targets = [], []
    for x, y in loader:
        probs.append(model.probabilities(model(x)).float())
        targets.append(y.round().int())
    return torch.cat(probs), torch.cat(targets)


def confusions(decided: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``C x 2 x 2`` counts: ``[c] = [[tn, fp], [fn, tp]]`` of class ``c`` (rows: actual no / yes,
    columns: decided no / yes); each class's four cells add up to the number of images."""
    pred, true = decided.astype(bool), targets.astype(bool)
    return np.stack([[[np.sum(~p & ~t), np.sum(p & ~t)], [np.sum(~p & t), np.sum(p & t)]]
                     for p, t in zip(pred.T, true.T)]).astype(np.int64).reshape(-1, 2, 2)


def precision_recall(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class precision and recall from :func:`confusions`, undefined cases as
    :func:`~visionsweep.models.multilabel.f1_scores` takes them: nothing decided yes gives precision 1 when
    there was nothing to find (else 0), nothing to find gives recall 1 when nothing was decided yes (else 0)."""
    tp, fp, fn = cm[:, 1, 1].astype(float), cm[:, 0, 1].astype(float), cm[:, 1, 0].astype(float)
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), (fn == 0).astype(float))
    recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), (fp == 0).astype(float))
    return precision, recall


def worst(probs: np.ndarray, targets: np.ndarray, decided: np.ndarray, k: int) -> dict[str, list[tuple[int, int]]]:
    """The surest mistakes as ``(class, image)`` pairs: ``fp`` (negatives decided yes, highest probability
    first) and ``fn`` (positives decided no, lowest first), each at most ``k`` in all.

    The classes take turns (each one's worst, then each one's second worst, ...), so every class with a
    mistake shows some and a class with many cannot crowd out the others; the pairs come back grouped by
    class, worst first. Ties keep image order.
    """
    out = {}
    for kind, wrong, key in (("fp", decided & (targets == 0), -probs), ("fn", ~decided & (targets == 1), probs)):
        ranked = [[int(i) for i in np.argsort(key[:, c], kind="stable") if wrong[i, c]]
                  for c in range(probs.shape[1])]
        chosen: list[tuple[int, int, int]] = []  # (class, rank, image)
        depth = 0
        while len(chosen) < k and any(depth < len(r) for r in ranked):
            for c, r in enumerate(ranked):
                if depth < len(r) and len(chosen) < k:
                    chosen.append((c, depth, r[depth]))
            depth += 1
        out[kind] = [(c, i) for c, _, i in sorted(chosen)]
    return out


def label_set(row: np.ndarray, classes: list[str]) -> list[str]:
    """The names of the classes an image holds (a 0/1 row), in class order."""
    return [classes[c] for c in np.flatnonzero(row)]


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def mistake_title(kind: str, name: str, prob: float, true: list[str]) -> str:
    """``FP <class> p=0.93`` over ``true: <labels>`` (``none`` for an image without labels), cut to fit a
    2.2-inch cell at 8 pt (~30 characters a line); ``$`` escaped so a name never switches on mathtext."""
    names = ", ".join(_short(t, 10) for t in true) or "none"
    return plain(f"{kind} {_short(name, 18)} p={prob:.2f}\n" + _short(f"true: {names}", 30))


def confusion_figure(cm: np.ndarray, classes: list[str], thresholds: np.ndarray, index: plots.Index) -> None:
    """Save ``confusion.png``: one 2 x 2 matrix per class (counts; colour: share of the actual row)."""
    n = len(classes)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plots.grid(rows, cols, panel=2.2)
    for c, ax in enumerate(axes.flat):
        if c >= n:
            ax.axis("off")
            continue
        pos = ax.get_position()  # room inside the cell for the tick and axis labels
        ax.set_position((pos.x0 + 0.24 * pos.width, pos.y0 + 0.22 * pos.height, 0.7 * pos.width, 0.7 * pos.height))
        m = cm[c]
        share = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(plain(f"{_short(classes[c], 24)}\nthreshold {thresholds[c]:.2f}"), fontsize=8)
        ax.set_xticks([0, 1], ["no", "yes"], fontsize=7)
        ax.set_yticks([0, 1], ["no", "yes"], fontsize=7)
        ax.set_xlabel("predicted", fontsize=7, labelpad=1)
        ax.set_ylabel("actual", fontsize=7, labelpad=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] > 0.6 else "black")
    index.save(fig, "confusion", "per-class 2x2 confusion at the tuned thresholds (rows: actual no/yes, "
                                 "columns: predicted no/yes)")


def table_figure(per_class: dict[str, dict[str, Any]], classes: list[str], index: plots.Index) -> None:
    """Save ``per_class.png``: precision / recall / F1 / AP / threshold / support per class and the macro average."""
    def num(v: float) -> str:
        return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"

    rows = [[plain(_short(c, 24)), *(num(per_class[c][k]) for k in STATS[:-1]), str(per_class[c]["support"])]
            for c in classes]
    macro = [float(np.mean([per_class[c][k] for c in classes])) for k in ("precision", "recall", "f1")]
    aps = [per_class[c]["ap"] for c in classes if per_class[c]["ap"] is not None and np.isfinite(per_class[c]["ap"])]
    rows.append(["macro avg", *(num(v) for v in macro), num(float(np.mean(aps))) if aps else "n/a", "",
                 str(sum(per_class[c]["support"] for c in classes))])
    fig, axes = plots.grid(1, 1, panel=6.0, aspect=max(0.3, 0.05 * (len(rows) + 2)))
    ax = axes[0, 0]
    ax.axis("off")
    ax.table(cellText=rows, colLabels=["class", "precision", "recall", "F1", "AP", "threshold", "support"],
             loc="center")
    ax.set_title("per class at the tuned thresholds (AP: threshold-free)", fontsize=8)
    index.save(fig, "per_class", "per-class precision / recall / F1 / AP / threshold / support table")


def gallery_figure(dataset: Any, kind: str, pairs: list[tuple[int, int]], probs: np.ndarray, targets: np.ndarray,
                   classes: list[str], index: plots.Index) -> list[dict[str, Any]]:
    """Save ``false_positives.png`` (``kind`` FP) or ``false_negatives.png`` (FN) of ``pairs``; returns
    their records (file, class, prob, true labels)."""
    cols = min(4, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plots.grid(rows, cols, panel=2.2)
    records = []
    for n, ax in enumerate(axes.flat):
        if n >= len(pairs):
            ax.axis("off")
            continue
        c, i = pairs[n]
        image, _ = dataset[i]
        true = label_set(targets[i], classes)
        plots.show(ax, image.numpy().transpose(1, 2, 0), mistake_title(kind, classes[c], float(probs[i, c]), true))
        records.append({"file": str(dataset.samples[i][0]), "class": classes[c],
                        "prob": round(float(probs[i, c]), 4), "true_labels": true})
    what = "false positives (highest probability among negatives)" if kind == "FP" else \
        "false negatives (lowest probability among positives)"
    name = "false_positives" if kind == "FP" else "false_negatives"
    shown = len({c for c, _ in pairs})
    index.save(fig, name, f"worst {len(pairs)} {what} of {shown} class(es) (title: class, p, true labels)")
    return records


def run(ck: Any, loader: Any, cfg: DictConfig, split: str, index: plots.Index) -> None:
    """The multi-label half of ``see=errors`` on an already chosen split's loader."""
    classes = ck.classes
    probs_t, targets_t = predict(ck.model, loader)
    thresholds_t = ck.model.thresholds.detach().float().cpu()
    decided = ck.model.decide(probs_t).cpu().numpy()
    scores, report = ml.final_scores(probs_t, targets_t, thresholds_t, classes)
    probs, targets, thresholds = probs_t.numpy(), targets_t.numpy(), thresholds_t.numpy()
    cm = confusions(decided, targets)
    precision, recall = precision_recall(cm)
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(classes):
        row = report["per_class"][name]
        ap = float(row["ap"])
        per_class[name] = {"precision": round(float(precision[c]), 6), "recall": round(float(recall[c]), 6),
                           "f1": round(float(row["f1"]), 6), "ap": round(ap, 6) if math.isfinite(ap) else None,
                           "threshold": round(float(thresholds[c]), 6), "support": int(targets[:, c].sum()),
                           "confusion": cm[c].tolist()}
    confusion_figure(cm, classes, thresholds, index)
    table_figure(per_class, classes, index)
    k = int(cfg.see.get("top_k") or 16)
    mistakes = worst(probs, targets, decided, k)
    galleries = {}
    for kind, key in (("FP", "fp"), ("FN", "fn")):
        if mistakes[key]:
            galleries[key] = gallery_figure(loader.dataset, kind, mistakes[key], probs, targets, classes, index)
        else:
            galleries[key] = []
            index.note(f"no false {'positives' if kind == 'FP' else 'negatives'} on the {split} split: no {kind} "
                       "gallery")
    with atomic_open(index.out_dir / "per_class.csv", "w", fsync=False, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", *STATS, "tn", "fp", "fn", "tp"])
        for c, name in enumerate(classes):
            row = per_class[name]
            writer.writerow([csv_cell(name), *("nan" if row[s] is None else f"{row[s]:.6f}" for s in STATS[:-1]),
                             row["support"], *(int(v) for v in cm[c].ravel())])
    if split == "val":
        index.note("the thresholds were tuned on this val split, so its F1 is optimistic: split=test for "
                   "an unbiased estimate")
    n = len(probs)
    m_ap, f1_macro = float(scores["test/map"]), float(scores["test/f1_macro"])
    index.data.update(checkpoint=str(ck.path), split=split, multilabel=True, n_images=n, classes=classes,
                      thresholds=[round(float(t), 6) for t in thresholds],
                      map=round(m_ap, 6) if math.isfinite(m_ap) else None, f1_macro=round(f1_macro, 6),
                      f1_micro=round(float(scores["test/f1_micro"]), 6), per_class=per_class,
                      false_positives=galleries["fp"], false_negatives=galleries["fn"])
    print(f"{split}: {n} images, mAP={m_ap:.4f}, F1 macro={f1_macro:.4f}", flush=True)
