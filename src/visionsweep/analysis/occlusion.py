"""Occlusion sensitivity (the seed's sliding grey block) with Captum (``FeatureAblation`` of blocks).

Each pixel's value is the mean drop in the target class probability over the block positions
that cover it: high where hiding the pixels hurts the prediction. Works for any backbone (CNN or
ViT): it only needs the model's output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from visionsweep.analysis import plots
from visionsweep.analysis.common import (image_probs, image_title, load_checkpoint, load_images, predicted,
                                         run_images, uint8_hwc)
from visionsweep.errors import ConfigError


def baseline_value(spec: Any, mean: tuple[float, ...]) -> torch.Tensor:
    """Per-channel fill value of the block in uint8 units (the model takes 0..255 input).

    Args:
        spec: ``mean`` (the backbone's mean colour: zero after normalisation), ``grey``, ``black``,
            ``white`` or a number 0..255.
        mean: the model's per-channel mean in 0..1.
    """
    named = {"mean": [255.0 * m for m in mean], "grey": [127.5] * 3, "gray": [127.5] * 3,
             "black": [0.0] * 3, "white": [255.0] * 3}
    if str(spec) in named:
        values = named[str(spec)]
    else:
        try:
            values = [float(spec)] * 3
        except (TypeError, ValueError):
            raise ConfigError(f"see.baseline={spec}: use mean, grey, black, white or a number 0..255") from None
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)


def window_and_stride(image_size: int, window: Any, stride: Any) -> tuple[int, int]:
    """Block side and step in pixels; defaults: a fifth of the image, half a block."""
    w = int(window) if window else max(2, round(image_size / 5))
    s = int(stride) if stride else max(1, w // 2)
    if not 1 <= w <= image_size or not 1 <= s <= image_size:
        raise ConfigError(f"see.window={w} / see.stride={s}: give sizes between 1 and the image size {image_size}")
    return w, s


def occlusion_maps(model: Any, x: torch.Tensor, targets: list[int], window: int, stride: int,
                   baseline: torch.Tensor, per_eval: int = 32) -> np.ndarray:
    """(N, H, W) maps of the drop in ``targets`` probability when a ``window`` block hides each pixel.

    The block slides in ``stride`` steps and may hang over the image edge (clipped), so every pixel
    is hidden by the same number of block positions. Plain sliding windows (Captum ``Occlusion``)
    cover border pixels by one block only, whose single noisy drop then often becomes the map's
    peak. Implemented as Captum ``FeatureAblation`` over shifted grids of blocks, averaged.

    Args:
        model: a ClassifierModule or SegmenterModule (uint8/float 0..255 NCHW in); a segmenter's class
            probability is its mean per-pixel probability (the share of the image given to the class).
        x: uint8 NCHW batch.
        targets: class index per image.
        window: block side in pixels.
        stride: block step in pixels.
        baseline: (1, 3, 1, 1) fill value in 0..255.
        per_eval: block positions evaluated per forward pass.
    """
    from captum.attr import FeatureAblation

    inputs = x.float()
    h, w = inputs.shape[-2:]
    ablate = FeatureAblation(lambda inp: image_probs(model, inp))
    total = torch.zeros(inputs.shape[0], h, w)
    offsets = range(0, window, stride)
    ys, xs = torch.arange(h).view(-1, 1), torch.arange(w).view(1, -1)
    with torch.no_grad():
        for oy in offsets:
            for ox in offsets:
                rows, cols = (ys + oy) // window, (xs + ox) // window
                mask = (rows * (int(cols.max()) + 1) + cols).expand(h, w).reshape(1, 1, h, w)
                attr = ablate.attribute(inputs, baselines=baseline.expand_as(inputs).contiguous(),
                                        target=list(targets), feature_mask=mask,
                                        perturbations_per_eval=max(1, int(per_eval)))
                total += attr.mean(dim=1)
    return (total / len(offsets) ** 2).numpy()


def pick_targets(ck: Any, probs: torch.Tensor, labels: list[int | None], target: Any) -> list[int]:
    """Class per image: predicted (``null``), true (``true``, else predicted), or a fixed class."""
    preds = predicted(ck.model, probs)
    if target is None or str(target) == "pred":
        return preds
    if str(target) == "true":
        return [y if y is not None else p for y, p in zip(labels, preds)]
    return [ck.class_index(target)] * len(preds)


def run(cfg: DictConfig, index: plots.Index) -> None:
    """``see=occlusion``: rows = images; columns = input | drop map | overlay."""
    ck = load_checkpoint(cfg)
    opts = cfg.see
    paths, labels = run_images(ck, cfg, int(opts.get("max_images") or 4))
    x = ck.prepare(load_images(paths))
    with torch.no_grad():
        probs = image_probs(ck.model, x)
    targets = pick_targets(ck, probs, labels, opts.get("target"))
    w, s = window_and_stride(int(ck.hp.image_size), opts.get("window"), opts.get("stride"))
    maps = occlusion_maps(ck.model, x, targets, w, s, baseline_value(opts.get("baseline", "mean"), ck.hp.mean),
                          opts.get("per_eval", 32))
    views = uint8_hwc(x)
    fig, axes = plots.grid(len(paths), 3)
    results = []
    for row, (path, label) in enumerate(zip(paths, labels)):
        t, heat = targets[row], maps[row]
        lim = max(abs(float(heat.min())), abs(float(heat.max())), 1e-6)
        pred = ck.predicted(probs[row:row + 1])[0]
        plots.show(axes[row, 0], views[row], image_title(ck, path, label))
        plots.show(axes[row, 1], heat, f"drop in p({ck.classes[t]})", cmap="RdBu_r", vmin=-lim, vmax=lim)
        plots.overlay(axes[row, 2], views[row], plots.to_display(np.clip(heat, 0, None)),
                      f"pred {ck.classes[pred]} {float(probs[row, pred]):.2f}")
        peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
        results.append({"image": str(path), "target": ck.classes[t], "pred": ck.classes[pred],
                        "prob": round(float(probs[row, t]), 4), "peak_yx": [int(peak[0]), int(peak[1])],
                        "max_drop": round(float(heat.max()), 4)})
    index.save(fig, "occlusion", f"occlusion: {w}px block, stride {s}, baseline {opts.get('baseline', 'mean')}",
               window=w, stride=s)
    np.save(index.out_dir / "occlusion_maps.npy", maps)
    index.data.update(results=results, checkpoint=str(ck.path), maps="occlusion_maps.npy")
