"""Inference with a classifier (loaded by :mod:`visionsweep.checkpoints`): list images, predict them
(optionally with TTA).

Test-time augmentation averages the probabilities (softmax; one sigmoid per class for multi-label) over views the model met in training, and only those:
averaging in a view the training pipeline never produced (a mirrored digit) lowers accuracy. The
views come from the run's ``augmentation.json`` (or its ``config.yaml``), see :func:`tta_views`:

- ``eval``: always (resize short side + centre crop, as validation);
- five crops (centre + 4 corners) of the image resized larger: only when the pipeline randomly crops
  or rescales (RandomResizedCrop, RandomCrop, Affine/ShiftScaleRotate with a scale or shift range...);
  the zoom is 1.15, or the pipeline's largest scale when that is smaller;
- the horizontal flip of each: only when the pipeline has a ``HorizontalFlip`` (or D4 /
  SquareSymmetry) with p > 0.

A checkpoint without a recorded pipeline gets the eval view alone (there is nothing to justify more).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from visionsweep import augment
from visionsweep.data.dataset import ImageFolderDataset, collate_images
from visionsweep.data.images import BadImageError, is_image_file
from visionsweep.errors import DataError
from visionsweep.utils.atomic import atomic_open
from visionsweep.utils.text import csv_cell
from visionsweep.models.classifier import ClassifierModule

log = logging.getLogger("visionsweep.inference")

TTA_ZOOM = 1.15  # the crops of the TTA views come from the image resized this much larger (at most)
CROPS = ("zoom_top_left", "zoom_top_right", "zoom_bottom_left", "zoom_bottom_right", "zoom_center")  # five_crop's order
FLIPS = {"HorizontalFlip", "D4", "SquareSymmetry"}  # transforms that mirror left-right
CROPPING = {"RandomResizedCrop", "RandomSizedCrop", "RandomCrop", "RandomSizedBBoxSafeCrop", "CropAndPad",
            "RandomCropFromBorders", "RandomScale", "BBoxSafeRandomCrop", "CropNonEmptyMaskIfExists"}
SCALING = {"Affine", "ShiftScaleRotate"}  # crop-like only when their scale / shift range is not 0


def list_images(path: str | Path) -> list[Path]:
    """One image, or every image under a folder (recursively, sorted)."""
    p = Path(str(path)).expanduser()
    if p.is_file():
        if not is_image_file(p):
            raise DataError(f"input '{path}' is not an image file (jpg, png, bmp, webp, tif)")
        return [p]
    if not p.is_dir():
        raise DataError(f"input '{path}' does not exist: give an image or a folder of images")
    found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f) and not f.name.startswith("."))
    if not found:
        raise DataError(f"input '{path}' holds no images (jpg, png, bmp, webp, tif)")
    return found


def _transforms(node: Any, parent_p: float = 1.0) -> list[tuple[str, dict[str, Any]]]:
    """(class name, arguments) of every transform in an ``A.to_dict`` tree that can fire (p > 0 all the way up)."""
    if not isinstance(node, dict):
        return []
    p = parent_p * float(node.get("p", 1.0) if node.get("p") is not None else 1.0)
    name = str(node.get("__class_fullname__", "")).rsplit(".", 1)[-1]
    out = [(name, node)] if p > 0 and name else []
    for child in node.get("transforms") or []:
        out += _transforms(child, p)
    return out


def _span(value: Any) -> tuple[float, float]:
    """(low, high) of an albumentations range argument: a number, a pair, or an ``{x: [..], y: [..]}`` dict."""
    if isinstance(value, dict):
        spans = [_span(v) for v in value.values() if v is not None]
        return (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else (0.0, 0.0)
    if isinstance(value, (list, tuple)) and value:
        return float(min(value)), float(max(value))
    if isinstance(value, (int, float)):
        return float(min(value, -value)), float(max(value, -value))  # a symmetric limit
    return 0.0, 0.0


def _zoom(name: str, args: dict[str, Any]) -> float | None:
    """The TTA zoom one transform justifies (None: it neither crops nor rescales)."""
    if name in CROPPING:
        return TTA_ZOOM
    if name == "Affine":
        lo, hi = _span(args.get("scale"))
        shift = max(abs(v) for v in _span(args.get("translate_percent")))
        if hi > 1.0 or lo < 1.0 or shift > 0:
            return min(TTA_ZOOM, max(hi, 1.0 + shift, 1.0 + (1.0 - lo)))
    if name == "ShiftScaleRotate":
        scale = max(abs(v) for v in _span(args.get("scale_limit")))
        shift = max(abs(v) for v in _span(args.get("shift_limit")))
        if scale > 0 or shift > 0:
            return min(TTA_ZOOM, 1.0 + max(scale, shift))
    return None


def tta_views(train_pipeline: dict[str, Any] | None) -> tuple[list[str], float]:
    """The TTA views a training pipeline justifies, and the zoom of its crops.

    Args:
        train_pipeline: the train pipeline as ``A.to_dict`` writes it (``augmentation.json``'s ``train``),
            or None when the run recorded none.

    Returns:
        View names (``eval``, the five ``zoom_*`` crops, ``hflip(<view>)``) and the zoom (1.0 without crops).
    """
    found = _transforms((train_pipeline or {}).get("transform", train_pipeline or {}))
    zooms = [z for z in (_zoom(n, a) for n, a in found) if z is not None]
    zoom = max(zooms) if zooms else 1.0
    views = ["eval"] + (list(CROPS) if zooms else [])
    if any(n in FLIPS for n, _ in found):
        views += [f"hflip({v})" for v in views]
    return views, zoom


def training_pipeline(run_dir: str | Path) -> dict[str, Any] | None:
    """A training run's train pipeline (``A.to_dict`` form) from its ``augmentation.json``, else None."""
    path = Path(run_dir) / "augmentation.json"
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    train = recorded.get("train") if isinstance(recorded, dict) else None
    return train if isinstance(train, dict) else None


class _Readable(ImageFolderDataset):
    """Samples ``(path, its index)``; with ``skip``, an unreadable file yields ``(None, index)`` and its
    reason in ``bad`` instead of raising."""

    def __init__(self, paths: list[Path], transform: Any, skip: bool, bad: dict[Path, str]) -> None:
        super().__init__([(p, i) for i, p in enumerate(paths)], transform)
        self.skip, self.bad = skip, bad

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        try:
            return super().__getitem__(index)
        except BadImageError as e:
            if not self.skip:
                raise
            self.bad[self.samples[index][0]] = e.reason or str(e)
            return None, index


def _collate_readable(batch: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The readable samples' batch and their indices (into ``paths``)."""
    good = [s for s in batch if s[0] is not None]
    return collate_images(good) if good else (None, torch.empty(0, dtype=torch.int64))


def predict_images(model: ClassifierModule, paths: list[Path], tta: bool = False, batch_size: int = 32,
                   device: str = "cpu", views: list[str] | None = None, zoom: float = TTA_ZOOM,
                   skipped: dict[Path, str] | None = None) -> torch.Tensor:
    """Class probabilities ``[len(paths), num_classes]`` with the checkpoint's eval preprocessing.

    Args:
        model: the classifier.
        paths: image files.
        tta: average over ``views`` (else the eval view alone).
        batch_size: images per forward pass.
        device: where the model runs.
        views: names from :func:`tta_views`; None with ``tta``: every view (eval, 5 crops, their flips).
        zoom: how much larger the image is resized before the five crops.
        skipped: None: an unreadable file raises :class:`BadImageError`. A dict: unreadable files are
            skipped, added to it (``{path: reason}``), and their rows are NaN.
    """
    hp = model.hparams
    size = int(hp.image_size)
    views = (views or ["eval", *CROPS] + [f"hflip({v})" for v in ["eval", *CROPS]]) if tta else ["eval"]
    unknown = [v for v in views if v.removeprefix("hflip(").removesuffix(")") not in ("eval", *CROPS)]
    if unknown:
        raise ValueError(f"unknown TTA view(s) {unknown}")
    plain = {"name": "predict", "train": [], "resize_first": True}  # train pipeline = the eval view
    eval_tf, _ = augment.build_pipelines(plain, size, hp.crop_pct, hp.interpolation)
    bad: dict[Path, str] = {}
    tfs = [eval_tf]
    crops = any("zoom_" in v for v in views)
    if crops:
        tfs.append(augment.build_pipelines(plain, max(size, round(size * zoom)), 1.0, hp.interpolation)[0])
    # both loaders drop the same unreadable files, so their batches stay aligned
    loaders = [DataLoader(_Readable(paths, tf, skipped is not None, bad), batch_size=batch_size,
                          collate_fn=_collate_readable) for tf in tfs]
    model = model.to(device)
    out = torch.full((len(paths), len(model.class_names)), float("nan"))
    with torch.inference_mode():
        for batches in zip(*loaders):
            if batches[0][0] is None:
                continue
            made = {"eval": batches[0][0]}
            if crops:
                from torchvision.transforms.v2.functional import five_crop

                made.update(zip(CROPS, five_crop(batches[1][0], [size, size])))
            batch = [made[v] if v in made else made[v[len("hflip("):-1]].flip(-1) for v in views]
            probs = torch.stack([model.probabilities(model(v.to(device))) for v in batch]).mean(dim=0)
            out[batches[0][1]] = probs.cpu().float()
    if skipped is not None:
        skipped.update(sorted(bad.items()))
    return out


def views_for_run(tta: bool, run_dir: Path) -> tuple[list[str], float]:
    """The TTA views the training run's pipeline justifies (just ``eval`` without tta), logged."""
    if not tta:
        return ["eval"], 1.0
    pipeline = training_pipeline(run_dir)
    views, zoom = tta_views(pipeline)
    why = "no augmentation.json in the checkpoint's run dir" if pipeline is None else "its training pipeline"
    log.info("tta: %d view(s) from %s: %s%s", len(views), why, ", ".join(views),
             f" (crops of the image resized x{zoom:.2f})" if zoom > 1 else "")
    if len(views) == 1:
        log.warning("tta: training neither cropped/rescaled nor flipped, so the eval view is the only one; "
                    "tta=true predicts as tta=false")
    return views, zoom


LABEL_JOIN = "|"  # between the classes of a multi-label prediction (as in multi-label split files)


def write_predictions(paths: list[Path], probs: list[list[float]], names: list[str], skipped: dict[Path, str],
                      csv_path: Path, thresholds: list[float] | None = None) -> list[dict[str, Any]]:
    """predictions.csv: path, predicted class, its probability, the label (a class-named parent folder), one
    probability column per class, and an ``error`` column when files were skipped; returns the rows.

    Multi-label (``thresholds`` given, one per class): ``predicted`` is the set of classes whose probability
    reaches their threshold, joined by ``|`` (empty: none), ``n_predicted`` their count, and one
    ``prob_<class>`` column per class; no ``probability`` or ``label`` column.

    Cells a spreadsheet would run as a formula get OWASP's leading ``'`` (:func:`visionsweep.utils.text.csv_cell`).
    """
    rows = []
    for path, p in zip(paths, probs):
        row: dict[str, Any] = {"path": str(path)}
        if path in skipped:
            row.update(predicted="", error=skipped[path], **({} if thresholds is not None else {"probability": ""}))
        elif thresholds is not None:
            chosen = [n for n, v, t in zip(names, p, thresholds) if v >= t]
            row.update(predicted=LABEL_JOIN.join(chosen), n_predicted=len(chosen))
            row.update({f"prob_{n}": round(v, 6) for n, v in zip(names, p)})
        else:
            best = max(range(len(names)), key=p.__getitem__)
            row.update(predicted=names[best], probability=round(p[best], 6))
            row.update({f"prob_{n}": round(v, 6) for n, v in zip(names, p)})
        if path.parent.name in names and thresholds is None:
            row["label"] = path.parent.name
        rows.append(row)
    first = ["path", "predicted", "n_predicted"] if thresholds is not None else ["path", "predicted", "probability"]
    columns = first + (["label"] if any("label" in r for r in rows) else []) \
        + [f"prob_{n}" for n in names] + (["error"] if skipped else [])
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)
    return rows


def print_predictions(rows: list[dict[str, Any]], show: int, csv_path: Path, acc: float | None, n_skipped: int) -> None:
    """The first ``show`` rows as a table, then one line: counts, accuracy on labelled images, the CSV."""
    from rich.console import Console
    from rich.markup import escape  # a class named "[red]" is a name, not rich markup
    from rich.table import Table

    multi = any("n_predicted" in r for r in rows)
    table = Table("image", "predicted", "classes" if multi else "probability", *(["label"] if acc is not None else []))
    for r in rows[:show]:
        if "error" in r:
            shown = "unreadable: skipped"
        else:
            shown = str(r["n_predicted"]) if multi else f"{r['probability']:.3f}"
        table.add_row(escape(Path(r["path"]).name), escape(r["predicted"]), shown,
                      *([escape(r.get("label", ""))] if acc is not None else []))
    Console().print(table)
    more = f" (first {show} shown)" if len(rows) > show else ""
    skipped = f", {n_skipped} unreadable skipped" if n_skipped else ""
    shown_acc = f", accuracy {acc:.4f} on {len(labelled(rows))} labelled" if acc is not None else ""
    print(f"{len(rows) - n_skipped} images{skipped}{more}{shown_acc}  → {csv_path}", flush=True)


def labelled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with a label (a class-named parent folder) and a prediction."""
    return [r for r in rows if "label" in r and r["predicted"] and "error" not in r]
