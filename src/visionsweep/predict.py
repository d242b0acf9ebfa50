"""Classify images: ``python -m visionsweep.predict ckpt_path=<run>/checkpoints/x.ckpt input=<image|folder> [tta=true]``.

The checkpoint carries the class names, input size, crop fraction, interpolation and mean/std, so
nothing else is needed. Prints a table and writes ``predictions.csv`` (path, predicted class, its
probability, then one probability column per class; a ``label`` column when images sit in folders
named after classes) in the run dir ``runs/predict/<time>/``.

``skip_bad_images=true`` skips files that cannot be read (empty, truncated, not an image) instead of
stopping at the first: one warning line gives the count, and each skipped file still gets its row in
``predictions.csv``, with empty predictions and the reason in an ``error`` column (a column only present
then); run.json lists them too (``skipped``: path and reason). Segmentation checkpoints write no mask
for them and list them in run.json. Without it, an unreadable file stops predict with one line naming it.

String cells of ``predictions.csv`` (paths, class names) that a spreadsheet would run as a formula
(starting with ``= + - @``, tab or CR) are written with a leading ``'``, as OWASP recommends.

``tta=true`` averages the softmax over the views the training pipeline justifies (its run dir's
``augmentation.json``): the eval view; 4 corner + centre crops of the image resized up to 15 % larger
only if training cropped or rescaled; the horizontal flip of each only if training flipped. The views
used are logged and written to run.json (``tta_views``); see :mod:`visionsweep.inference`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from visionsweep import checkpoints, runinfo
from visionsweep.data.images import bad_image_advice
from visionsweep.errors import ConfigError, DataError
from visionsweep.utils import checks
from visionsweep.utils.cli import guarded, precheck

log = logging.getLogger("visionsweep.predict")

FIX = "remove it or set skip_bad_images=true"  # predict's key (it has no data.*)
#: predict's own numeric keys and flags → their check
VALUES = {"batch_size": lambda v, k: checks.whole(v, k, 1, None, 32),
          "show": lambda v, k: checks.whole(v, k, 0, None, 20), "tta": checks.flag, "skip_bad_images": checks.flag}


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Predict ``cfg.input`` with ``cfg.ckpt_path``; writes predictions.csv and returns its rows."""
    with bad_image_advice(FIX):
        return _predict(cfg)


def _predict(cfg: DictConfig) -> list[dict[str, Any]]:
    out = Path(cfg.paths.output_dir)
    if cfg.get("input") in (None, ""):
        raise ConfigError("input is required: input=<image or folder>")
    checks.keys(cfg, VALUES)
    skip = bool(cfg.get("skip_bad_images"))
    loaded = checkpoints.load(cfg.ckpt_path, cfg.paths.log_dir)
    import torch  # (heavy, with inference's timm: after the checks above, so that a wrong path fails in a second)

    from visionsweep.inference import (
        labelled, list_images, predict_images, print_predictions, views_for_run, write_predictions)

    device = str(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if loaded.kind == "segmenter":
        return _predict_masks(cfg, loaded, device, out, skip)
    model, ckpt = loaded.model, loaded.path
    paths = list_images(cfg.input)
    views, zoom = views_for_run(bool(cfg.tta), loaded.run_dir)
    skipped: dict[Path, str] | None = {} if skip else None
    probs = predict_images(model, paths, tta=bool(cfg.tta), batch_size=int(cfg.batch_size), device=device,
                           views=views, zoom=zoom, skipped=skipped)
    skipped = skipped or {}
    _warn_skipped(skipped, len(paths), cfg.input, "rows with an error in predictions.csv")
    thresholds = model.thresholds.tolist() if model.multilabel else None  # tuned on validation, in the checkpoint
    rows = write_predictions(paths, probs.tolist(), list(model.class_names), skipped, out / "predictions.csv",
                             thresholds)
    known = labelled(rows)
    acc = sum(r["label"] == r["predicted"] for r in known) / len(known) if known else None
    runinfo.RunRecord(out, task="predict", checkpoint=str(ckpt), input=str(cfg.input), tta=bool(cfg.tta),
                      tta_views=views, tta_zoom=zoom if zoom > 1 else None, n_images=len(rows) - len(skipped),
                      skipped=_listed(skipped), accuracy=acc).finish(runinfo.Status.OK)
    print_predictions(rows, int(cfg.get("show") or 20), out / "predictions.csv", acc, len(skipped))
    return rows


def _warn_skipped(skipped: dict[Path, str], total: int, source: Any, where: str) -> None:
    """One warning line for the skipped files; a DataError when no file was readable at all."""
    if not skipped:
        return
    if len(skipped) == total:
        first = next(iter(skipped))
        raise DataError(f"input '{source}': none of its {total} image(s) can be read, e.g. '{first}' "
                        f"({skipped[first]}): give readable images")
    log.warning("skip_bad_images: skipped %d unreadable image(s) of %d (%s)", len(skipped), total, where)


def _listed(skipped: dict[Path, str]) -> list[dict[str, str]]:
    return [{"path": str(p), "error": why} for p, why in skipped.items()]


def _predict_masks(cfg: DictConfig, loaded: checkpoints.LoadedCheckpoint, device: str,
                   out: Path, skip: bool) -> list[dict[str, Any]]:
    """Segmentation checkpoints: mask PNGs (class indices, palette) in <run>/masks/."""
    from visionsweep.models.segmenter import predict_folder

    skipped: dict[Path, str] = {}
    written = predict_folder(loaded.model.to(device), cfg.input, out / "masks", skipped=skipped if skip else None)
    _warn_skipped(skipped, len(written) + len(skipped), cfg.input, "listed in run.json, skipped")
    runinfo.RunRecord(out, task="predict", checkpoint=str(loaded.path), input=str(cfg.input),
                      n_images=len(written), skipped=_listed(skipped)).finish(runinfo.Status.OK)
    print(f"\n{len(written)} masks → {out / 'masks'}", flush=True)
    return [{"path": str(p)} for p in written]


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
@guarded
def _hydra_main(cfg: DictConfig) -> None:
    predict(cfg)


def main() -> None:
    """Console entry point."""
    precheck("predict")
    _hydra_main()


if __name__ == "__main__":
    main()
