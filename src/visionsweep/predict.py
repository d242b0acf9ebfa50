"""Classify images: ``python -m visionsweep.predict ckpt_path=<run>/checkpoints/x.ckpt input=<image|folder> [tta=true]``.

The checkpoint carries the class names, input size, crop fraction, interpolation and mean/std, so
nothing else is needed. Prints a table and writes ``predictions.csv`` (path, predicted class, its
probability, then one probability column per class; a ``label`` column when images sit in folders
named after classes) in the run dir ``runs/predict/<time>/``.

``tta=true`` averages the softmax over 12 views: the eval view, 4 corner + centre crops of the image
resized 15 % larger, and the horizontal flip of each (fastai's ``tta`` uses augmented views too).
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
from visionsweep.inference import list_images, predict_images
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
    probs = predict_images(model, paths, tta=bool(cfg.tta), batch_size=int(cfg.batch_size), device=device)
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
                      n_images=len(rows), accuracy=acc, status="ok")
    _print_table(rows, int(cfg.get("show") or 20), out, acc)
    return rows


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


@hydra.main(version_base="1.3", config_path="../../conf", config_name="predict")
@guarded
def _hydra_main(cfg: DictConfig) -> None:
    predict(cfg)


def main() -> None:
    """Console entry point."""
    precheck("predict")
    _hydra_main()


if __name__ == "__main__":
    main()
