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
from visionsweep.analysis.common import checkpoint_and_images, image_probs, image_title, predicted, uint8_hwc
from visionsweep.errors import ConfigError
from visionsweep.utils.atomic import atomic_open


def baseline_value(spec: Any, mean: tuple[float, ...], x: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel fill value of the block in uint8 units (the model takes 0..255 input).

    Args:
        spec: ``background`` (each image's own border colour, the median of its edge pixels: hiding a
            part then means "replace it by background", where a grey block on a black-background digit
            would add a shape of its own), ``mean`` (the backbone's mean colour: zero after
            normalisation), ``grey``, ``black``, ``white`` or a number 0..255.
        mean: the model's per-channel mean in 0..1.
        x: the uint8 NCHW batch (needed for ``background``).

    Returns:
        ``(1, 3, 1, 1)``, or ``(N, 3, 1, 1)`` for ``background``.
    """
    if str(spec) == "background":
        if x is None:
            raise ConfigError("see.baseline=background needs the images")
        border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2).float()
        return border.median(dim=2).values.view(x.shape[0], x.shape[1], 1, 1)
    named = {"mean": [255.0 * m for m in mean], "grey": [127.5] * 3, "gray": [127.5] * 3,
             "black": [0.0] * 3, "white": [255.0] * 3}
    if str(spec) in named:
        values = named[str(spec)]
    else:
        try:
            values = [float(spec)] * 3
        except (TypeError, ValueError):
            raise ConfigError(f"see.baseline={spec}: use background, mean, grey, black, white or a number 0..255"
                              ) from None
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
        baseline: (1, 3, 1, 1) or (N, 3, 1, 1) fill value in 0..255.
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


def occlusion_figure(views: np.ndarray, maps: np.ndarray, titles: list[str], explained: list[str],
                     preds: list[str], pred_probs: list[float]) -> Any:
    """Rows = images; columns = input | drop map with its colour bar | the drop over the input.

    Args:
        views: uint8 NHWC images as the model saw them.
        maps: (N, H, W) drops in the explained class's probability.
        titles: one per image (its true class and file).
        explained: the class each map explains.
        preds: the predicted class of each image.
        pred_probs: the probability of that prediction.

    Returns:
        The figure (``3 * N`` cells plus ``N`` colour bars).
    """
    fig, axes = plots.grid(len(views), 3)
    for row, heat in enumerate(maps):
        lim = max(abs(float(heat.min())), abs(float(heat.max())), 1e-6)  # symmetric: white = no change
        plots.show(axes[row, 0], views[row], titles[row])
        shown = plots.show(axes[row, 1], heat, f"occlusion: drop in p({explained[row]})", cmap="RdBu_r",
                           vmin=-lim, vmax=lim)
        plots.colorbar(axes[row, 1], shown)
        plots.overlay(axes[row, 2], views[row], np.clip(heat, 0, None), f"pred {preds[row]} {pred_probs[row]:.2f}",
                      vmax=lim)
    return fig


def run(cfg: DictConfig, index: plots.Index) -> None:
    """``see=occlusion``: rows = images; columns = input | drop map | overlay."""
    ck, paths, labels, x = checkpoint_and_images(cfg, index)
    opts = cfg.see
    with torch.no_grad():
        probs = image_probs(ck.model, x)
    targets = pick_targets(ck, probs, labels, opts.get("target"))
    w, s = window_and_stride(int(ck.hp.image_size), opts.get("window"), opts.get("stride"))
    fill = baseline_value(opts.get("baseline", "background"), ck.hp.mean, x)
    maps = occlusion_maps(ck.model, x, targets, w, s, fill, opts.get("per_eval", 32))
    preds = ck.predicted(probs)
    fig = occlusion_figure(uint8_hwc(x), maps, [image_title(ck, p, y) for p, y in zip(paths, labels)],
                           [ck.classes[t] for t in targets], [ck.classes[p] for p in preds],
                           [float(probs[i, p]) for i, p in enumerate(preds)])
    results = []
    for row, (path, heat) in enumerate(zip(paths, maps)):
        t, pred = targets[row], preds[row]
        peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
        results.append({"image": str(path), "target": ck.classes[t], "pred": ck.classes[pred],
                        "prob": round(float(probs[row, t]), 4), "peak_yx": [int(peak[0]), int(peak[1])],
                        "max_drop": round(float(heat.max()), 4)})
    index.save(fig, "occlusion", f"occlusion: drop in p(class) under a {w}px block, stride {s}, baseline "
               f"{opts.get('baseline', 'background')}", window=w, stride=s)
    with atomic_open(index.out_dir / "occlusion_maps.npy", "wb", fsync=False) as fh:
        np.save(fh, maps)
    index.data.update(results=results, checkpoint=str(ck.path), maps="occlusion_maps.npy")
