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
from visionsweep.analysis.common import image_title, load_checkpoint, load_images, run_images, uint8_hwc
from visionsweep.analysis.features import feature_points
from visionsweep.errors import ConfigError


def cam_layer(model: Any, x: torch.Tensor, name: str | None = None) -> tuple[str, nn.Module]:
    """The layer Grad-CAM attributes to: ``name``, else the last timm feature point; must be spatial.

    Raises:
        ConfigError: an unknown layer, or one whose output is not an NCHW map (e.g. ViT blocks).
    """
    net = model.net
    name = name or feature_points(net)[-1]["module"]
    try:
        layer = net.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"see.layer='{name}' is not a module of {model.hparams.backbone} "
                          "(names as in model.net.named_modules(), e.g. layer4, stages.3)") from None
    shapes: list[tuple[int, ...]] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        handle.remove()
    if not shapes or len(shapes[0]) != 4:
        got = "x".join(map(str, shapes[0])) if shapes else "nothing"
        raise ConfigError(
            f"see=gradcam does not apply to {model.hparams.backbone}: its layer '{name}' gives {got} "
            "(tokens, not a conv feature map), and Grad-CAM needs a spatial conv stage; use see=occlusion "
            "or see=features, which work for transformers")
    return name, layer


def gradcam_maps(model: Any, layer: nn.Module, x: torch.Tensor, targets: list[int]) -> np.ndarray:
    """(N, H, W) ReLU'd Grad-CAM maps for ``targets``, upsampled to the input size."""
    from captum.attr import LayerAttribution, LayerGradCam

    gc = LayerGradCam(model, layer)
    with torch.enable_grad():
        attr = gc.attribute(x.float(), target=list(targets), relu_attributions=True)
    up = LayerAttribution.interpolate(attr.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return up[:, 0].numpy()


def run(cfg: DictConfig, index: plots.Index) -> None:
    """``see=gradcam``: rows = images; columns = input | CAM of the prediction | CAM of each chosen class."""
    ck = load_checkpoint(cfg)
    opts = cfg.see
    paths, labels = run_images(ck, cfg, int(opts.get("max_images") or 4))
    x = ck.prepare(load_images(paths))
    name, layer = cam_layer(ck.model, x, opts.get("layer"))
    with torch.no_grad():
        probs = ck.model(x).softmax(1)
    preds = probs.argmax(1).tolist()
    chosen = [ck.class_index(c) for c in (opts.get("classes") or [])]
    columns = [("pred", preds)] + [(ck.classes[c], [c] * len(paths)) for c in chosen]
    maps = {title: gradcam_maps(ck.model, layer, x, targets) for title, targets in columns}
    views = uint8_hwc(x)
    fig, axes = plots.grid(len(paths), 1 + len(columns))
    for row, (path, label) in enumerate(zip(paths, labels)):
        plots.show(axes[row, 0], views[row], image_title(ck, path, label))
        for col, (title, targets) in enumerate(columns, start=1):
            c = targets[row]
            head = f"pred {ck.classes[c]}" if title == "pred" else ck.classes[c]
            plots.overlay(axes[row, col], views[row], plots.to_display(maps[title][row]),
                          f"{head} p={float(probs[row, c]):.2f}")
    index.save(fig, "gradcam", f"Grad-CAM on {name} (predicted class and {len(chosen)} chosen)",
               layer=name)
    index.data.update(checkpoint=str(ck.path), layer=name, images=[str(p) for p in paths],
                      predicted=[ck.classes[p] for p in preds])
