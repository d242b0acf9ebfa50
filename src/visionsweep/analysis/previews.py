"""Check the data before a sweep: augmentation variants of a preset, and a batch as the model gets it.

Both use the composed ``data``, ``augmentation`` and ``model`` groups (``see=augment data=shapes
augmentation=strong model=resnet18``), built by the same code as training (``builders``), so what
is shown is what a run with those groups would train on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from visionsweep.analysis import plots
from visionsweep.analysis.common import image_paths, load_images, short_title, uint8_hwc


def _data(cfg: DictConfig) -> tuple[Any, Any]:
    """Seeded data module (writes nothing) and the resolved input config of the composed groups."""
    import pytorch_lightning as pl

    from visionsweep import builders

    pl.seed_everything(int(cfg.get("seed") or 0), workers=True, verbose=False)
    inp = builders.resolve_inputs(cfg)
    return builders.build_datamodule(cfg, inp, None), inp


def spread(samples: list[tuple[Path, int]], n: int) -> list[tuple[Path, int]]:
    """``n`` samples taking classes in turn (the first image of each class, then the second...)."""
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for s in samples:
        by_class.setdefault(int(s[1]), []).append(s)
    out: list[tuple[Path, int]] = []
    depth = 0
    while len(out) < n and any(depth < len(v) for v in by_class.values()):
        out += [v[depth] for _, v in sorted(by_class.items()) if depth < len(v)]
        depth += 1
    return out[:n]


def run_augment(cfg: DictConfig, index: plots.Index) -> None:
    """``see=augment``: rows = samples; columns = original | M train variants | eval view."""
    dm, inp = _data(cfg)
    opts = cfg.see
    n, m = int(opts.get("samples") or 4), int(opts.get("variants") or 6)
    if cfg.get("image"):
        paths = image_paths(cfg.image, n)
        titles = [short_title(p) for p in paths]
    else:
        chosen = spread(dm.train_samples, n)
        paths = [Path(p) for p, _ in chosen]
        titles = [f"{dm.classes[y]}: {short_title(Path(p), 14)}" for p, y in chosen]
    images = load_images(paths)
    train_tf, eval_tf = dm.train_transform, dm.eval_transform
    fig, axes = plots.grid(len(images), m + 2)
    for row, img in enumerate(images):
        plots.show(axes[row, 0], img, f"{titles[row]} {img.shape[0]}x{img.shape[1]}")
        for col in range(1, m + 1):
            plots.show(axes[row, col], train_tf(image=img)["image"], f"train #{col}")
        plots.show(axes[row, m + 1], eval_tf(image=img)["image"], "eval view")
    preset = cfg.augmentation.get("name") or "augmentation"
    index.save(fig, f"augment_{preset}", f"augmentation '{preset}': original | {m} train variants | eval view "
               f"({inp.image_size} px)", preset=preset, image_size=inp.image_size)
    index.data.update(preset=preset, images=[str(p) for p in paths])


def run_batch(cfg: DictConfig, index: plots.Index) -> None:
    """``see=batch``: the first training batch (shuffled, augmented) with its labels."""
    dm, inp = _data(cfg)
    x, y = next(iter(dm.train_dataloader()))
    limit = int(cfg.see.get("max_images") or 32)
    x, y = x[:limit], y[:limit]
    # The loader's uint8 batch is exactly what the model gets; it normalises on the device with
    # (x / 255 - mean) / std. Undoing that normalisation gives this batch back, so it is shown as is.
    normalised = (x.float() / 255 - torch.tensor(inp.mean).view(1, 3, 1, 1)) / torch.tensor(inp.std).view(1, 3, 1, 1)
    shown = denormalise(normalised, inp.mean, inp.std)
    cols = min(8, len(x))
    rows = math.ceil(len(x) / cols)
    fig, axes = plots.grid(rows, cols, panel=1.4)
    for k, ax in enumerate(axes.flat):
        if k < len(x):
            plots.show(ax, shown[k], dm.classes[int(y[k])][:14])
        else:
            ax.axis("off")
    index.save(fig, "batch", f"first training batch: {len(x)} of {dm.batch_size} images, "
               f"{inp.image_size} px, augmentation '{cfg.augmentation.get('name')}'")
    index.data.update(labels=[dm.classes[int(v)] for v in y], mean=list(inp.mean), std=list(inp.std),
                      batch_shape=list(x.shape), dtype=str(x.dtype))


def denormalise(x: torch.Tensor, mean: Any, std: Any) -> np.ndarray:
    """Normalised float NCHW → uint8 NHWC for display."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return uint8_hwc(((x * s + m) * 255).round().clamp(0, 255).to(torch.uint8))
