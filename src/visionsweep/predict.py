"""Classify images: ``python -m visionsweep.predict ckpt_path=<run>/checkpoints/x.ckpt input=<image|folder> [tta=true]``.

The checkpoint carries the class names, input size, crop fraction, interpolation and mean/std, so
nothing else is needed. Prints a table and writes ``predictions.csv`` (path, predicted class, its
probability, then one probability column per class; a ``label`` column when images sit in folders
named after classes) in the run dir ``runs/predict/<time>/``.

``tta=true`` averages the softmax over the views the training pipeline justifies (its run dir's
``augmentation.json``): the eval view; 4 corner + centre crops of the image resized up to 15 % larger
only if training cropped or rescaled; the horizontal flip of each only if training flipped. The views
used are logged and written to run.json (``tta_views``); see :mod:`visionsweep.inference`.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from visionsweep import checkpoints, runinfo
from visionsweep.errors import ConfigError
from visionsweep.inference import list_images, predict_images, training_pipeline, tta_views
from visionsweep.utils.cli import guarded, precheck

log = logging.getLogger("visionsweep.predict")


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Predict ``cfg.input`` with ``cfg.ckpt_path``; writes predictions.csv and returns its rows."""
    out = Path(cfg.paths.output_dir)
    if cfg.get("input") in (None, ""):
        raise ConfigError("input is required: input=<image or folder>")
    loaded = checkpoints.load(cfg.ckpt_path, cfg.paths.log_dir)
    device = str(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if loaded.kind == "segmenter":
        return _predict_masks(cfg, loaded, device, out)
    model, ckpt = loaded.model, loaded.path
    paths = list_images(cfg.input)
    views, zoom = _views(bool(cfg.tta), loaded.run_dir)
    probs = predict_images(model, paths, tta=bool(cfg.tta), batch_size=int(cfg.batch_size), device=device,
                           views=views, zoom=zoom)
    names = list(model.class_names)
    rows = []
    for path, p in zip(paths, probs.tolist()):
        best = max(range(len(names)), key=p.__getitem__)
        row = {"path": str(path), "predicted": names[best], "probability": round(p[best], 6)}
        if path.parent.name in names:
            row["label"] = path.parent.name
        rows.append({**row, **{f"prob_{n}": round(v, 6) for n, v in zip(names, p)}})
    columns = ["path", "predicted", "probability"] + (["label"] if any("label" in r for r in rows) else []) \
        + [f"prob_{n}" for n in names]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions.csv").open("w", newline="") as f:
        csv.DictWriter(f, fieldnames=columns, restval="").writeheader()
        csv.DictWriter(f, fieldnames=columns, restval="").writerows(rows)
    labelled = [r for r in rows if "label" in r]
    acc = sum(r["label"] == r["predicted"] for r in labelled) / len(labelled) if labelled else None
    runinfo.RunRecord(out, task="predict", checkpoint=str(ckpt), input=str(cfg.input), tta=bool(cfg.tta),
                      tta_views=views, tta_zoom=zoom if zoom > 1 else None, n_images=len(rows), accuracy=acc,
                      status="ok")
    _print_table(rows, int(cfg.get("show") or 20), out, acc)
    return rows


def _views(tta: bool, run_dir: Path) -> tuple[list[str], float]:
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


def _predict_masks(cfg: DictConfig, loaded: checkpoints.LoadedCheckpoint, device: str,
                   out: Path) -> list[dict[str, Any]]:
    """Segmentation checkpoints: mask PNGs (class indices, palette) in <run>/masks/."""
    from visionsweep.models.segmenter import predict_folder

    written = predict_folder(loaded.model.to(device), cfg.input, out / "masks")
    runinfo.RunRecord(out, task="predict", checkpoint=str(loaded.path), input=str(cfg.input),
                      n_images=len(written), status="ok")
    print(f"\n{len(written)} masks → {out / 'masks'}", flush=True)
    return [{"path": str(p)} for p in written]


def _print_table(rows: list[dict[str, Any]], show: int, out: Path, acc: float | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("image", "predicted", "probability", *(["label"] if acc is not None else []))
    for r in rows[:show]:
        table.add_row(Path(r["path"]).name, r["predicted"], f"{r['probability']:.3f}",
                      *([r.get("label", "")] if acc is not None else []))
    Console().print(table)
    more = f" (first {show} shown)" if len(rows) > show else ""
    shown_acc = f", accuracy {acc:.4f} on {sum('label' in r for r in rows)} labelled" if acc is not None else ""
    print(f"{len(rows)} images{more}{shown_acc}  → {out / 'predictions.csv'}", flush=True)


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
