"""Grad-CAM (Captum ``LayerGradCam``) on the last convolutional stage, overlaid on the image.

Grad-CAM weighs a layer's channels by the mean gradient of the class score over space, so the
layer must give a spatial ``N x C x H x W`` map. Transformers (ViT) give tokens (``N x L x C``)
at every block: for them this mode stops with a message pointing to ``see=occlusion`` and
``see=features``, which work on any backbone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig

from visionsweep.analysis import plots
from visionsweep.analysis.common import (backbone, checkpoint_and_images, image_probs, image_scores, image_title,
                                         uint8_hwc)
from visionsweep.analysis.features import feature_points
from visionsweep.errors import ConfigError
from visionsweep.utils.text import plain

MIN_MAP = 4  # smallest map side Grad-CAM uses by default (ResNets at 224 px give 7x7)


def _output_shapes(model: Any, x: torch.Tensor, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Output shape of each named module of the model's backbone for one image."""
    shapes: dict[str, tuple[int, ...]] = {}

    def grab(name: str) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:  # returns None: the output stays as it is
            shapes.setdefault(name, tuple(out.shape))
        return hook

    handles = [backbone(model).get_submodule(n).register_forward_hook(grab(n)) for n in names]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return shapes


def cam_layer(model: Any, x: torch.Tensor, name: str | None = None) -> tuple[str, nn.Module]:
    """The layer Grad-CAM attributes to: ``name``, else the deepest timm feature point (stage) whose map
    is at least ``MIN_MAP`` x ``MIN_MAP`` at this input size (a 1x1 map cannot localise anything, a 2x2 one
    only names a quadrant); it must be spatial.

    Raises:
        ConfigError: an unknown layer, or one whose output is not an NCHW map (e.g. ViT blocks).
    """
    net = backbone(model)
    candidates = [name] if name else [p["module"] for p in feature_points(net)][::-1]
    for cand in candidates:
        try:
            net.get_submodule(cand)
        except AttributeError:
            raise ConfigError(f"see.layer='{cand}' is not a module of {model.hparams.backbone} "
                              "(names as in its timm backbone's named_modules(), e.g. layer4, stages.3)") from None
    shapes = _output_shapes(model, x, candidates)
    first = shapes.get(candidates[0], ())
    if len(first) != 4:
        got = "x".join(map(str, first)) or "nothing"
        raise ConfigError(
            f"see=gradcam does not apply to {model.hparams.backbone}: its layer '{candidates[0]}' gives {got} "
            "(tokens, not a conv feature map), and Grad-CAM needs a spatial conv stage; use see=occlusion "
            "or see=features, which work for transformers")
    chosen = next((c for c in candidates if len(shapes.get(c, ())) == 4 and min(shapes[c][-2:]) >= MIN_MAP),
                  candidates[0])
    return chosen, net.get_submodule(chosen)


def gradcam_maps(model: Any, layer: nn.Module, x: torch.Tensor, targets: list[int]) -> np.ndarray:
    """(N, H, W) ReLU'd Grad-CAM maps for ``targets``, upsampled to the input size.

    A segmenter's class score is its logit averaged over the pixels (Seg-Grad-CAM over the whole image).
    """
    from captum.attr import LayerAttribution, LayerGradCam

    gc = LayerGradCam(lambda inp: image_scores(model, inp), layer)
    with torch.enable_grad():
        attr = gc.attribute(x.float(), target=list(targets), relu_attributions=True)
    up = LayerAttribution.interpolate(attr.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return up[:, 0].numpy()


def cam_figure(views: np.ndarray, titles: list[str], columns: list[tuple[list[int], np.ndarray]],
               classes: list[str], probs: torch.Tensor) -> Any:
    """Rows = images; columns = input | one Grad-CAM overlay (with its colour bar) per explained class.

    Args:
        views: uint8 NHWC images as the model saw them.
        titles: one per image.
        columns: per CAM column, the class index per image and the (N, H, W) maps.
        classes: class names.
        probs: (N, classes) probabilities, shown as ``p=`` of the explained class.

    Returns:
        The figure (``N * (1 + len(columns))`` cells plus a colour bar per CAM).
    """
    fig, axes = plots.grid(len(views), 1 + len(columns))
    for row in range(len(views)):
        plots.show(axes[row, 0], views[row], titles[row])
        for col, (targets, maps) in enumerate(columns, start=1):
            c, heat = targets[row], maps[row]
            # one scale per map (CAM magnitudes are not comparable across images), starting at 0 = no evidence
            title = plain(f"Grad-CAM for class {classes[c]}\np={float(probs[row, c]):.2f}" + (" (predicted)" * (col == 1)))
            bar = plots.overlay(axes[row, col], views[row], heat, title, vmax=max(float(heat.max()), 1e-12))
            plots.colorbar(axes[row, col], bar)
    return fig


def run(cfg: DictConfig, index: plots.Index) -> None:
    """``see=gradcam``: rows = images; columns = input | CAM of the prediction | CAM of each chosen class."""
    ck, paths, labels, x = checkpoint_and_images(cfg, index)
    opts = cfg.see
    name, layer = cam_layer(ck.model, x, opts.get("layer"))
    last = feature_points(ck.backbone)[-1]["module"]
    if not opts.get("layer") and name != last:
        side = "x".join(map(str, _output_shapes(ck.model, x, [last])[last][-2:]))
        index.note(f"{last} gives a {side} map at {ck.hp.image_size} px, too coarse to localise: used {name}, "
                   f"the deepest stage with a map of at least {MIN_MAP}x{MIN_MAP}")
    with torch.no_grad():
        probs = image_probs(ck.model, x)
    preds = ck.predicted(probs)
    chosen = [ck.class_index(c) for c in (opts.get("classes") or [])]
    targets = [preds] + [[c] * len(paths) for c in chosen]
    columns = [(t, gradcam_maps(ck.model, layer, x, t)) for t in targets]
    fig = cam_figure(uint8_hwc(x), [image_title(ck, p, y) for p, y in zip(paths, labels)], columns, ck.classes,
                     probs)
    index.save(fig, "gradcam", f"Grad-CAM on {name}: the predicted class and {len(chosen)} chosen", layer=name)
    index.data.update(checkpoint=str(ck.path), layer=name, images=[str(p) for p in paths],
                      predicted=[ck.classes[p] for p in preds])
