"""Feature maps (top-k channels per stage, shallow → deep) and first-layer filters as RGB tiles.

Layers are timm's ``feature_info`` points (one per stage for CNNs, one per block for ViTs); their
activations come from timm's ``forward_intermediates`` (tokens reshaped to a grid for ViTs), or from
forward hooks on the ``feature_info`` modules for models without it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from visionsweep.analysis import plots
from visionsweep.analysis.common import backbone, checkpoint_and_images, image_title, load_checkpoint, uint8_hwc
from visionsweep.errors import ConfigError

MAX_DEFAULT_LAYERS = 6


def feature_points(net: nn.Module) -> list[dict[str, Any]]:
    """timm's feature points of ``net``: dicts with ``module``, ``num_chs`` and ``reduction``."""
    info = getattr(net, "feature_info", None)
    if not info:
        raise ConfigError(f"backbone {type(net).__name__} has no timm feature_info: see=features needs a timm model")
    # a features-only net (a segmenter's encoder) keeps only its out_indices: get_dicts() lists those
    return [dict(i) for i in (info.get_dicts() if hasattr(info, "get_dicts") else info)]


def choose_layers(info: list[dict[str, Any]], layers: list[Any] | None) -> list[int]:
    """Indices into ``info``: given ones (ints or module names), else all (≤ 6) or 4 spread over the depth."""
    if layers is None:
        if len(info) <= MAX_DEFAULT_LAYERS:
            return list(range(len(info)))
        return sorted({round(i * (len(info) - 1) / 3) for i in range(4)})  # ViTs: one point per block
    names = [i["module"] for i in info]
    out = []
    for layer in layers:
        if isinstance(layer, int) and -len(info) <= layer < len(info):
            out.append(layer % len(info))
        elif str(layer) in names:
            out.append(names.index(str(layer)))
        else:
            raise ConfigError(f"see.layers: '{layer}' is not a feature point of this backbone: use an index "
                              f"0..{len(info) - 1} or one of {', '.join(names)}")
    return sorted(set(out))


@torch.no_grad()
def activations(model: Any, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """NCHW activations at the feature points ``indices`` for a uint8 batch ``x`` (classifier or segmenter)."""
    from visionsweep.checkpoints import is_segmenter

    net, xn = backbone(model), model.pixels(x)
    if is_segmenter(model):  # its encoder is a timm features-only net: one map per feature point
        outs = net(xn)
        return [outs[i] for i in indices]
    if hasattr(net, "forward_intermediates"):
        try:
            outs = net.forward_intermediates(xn, indices=list(indices), intermediates_only=True)
            if len(outs) == len(indices) and all(o.ndim == 4 for o in outs):
                return list(outs)
        except (NotImplementedError, TypeError, AssertionError, ValueError):
            pass
    info, grabbed = feature_points(net), {}
    handles = [net.get_submodule(info[i]["module"]).register_forward_hook(
        lambda _m, _i, out, i=i: grabbed.__setitem__(i, out)) for i in indices]
    try:
        net(xn)
    finally:
        for h in handles:
            h.remove()
    outs = [grabbed[i] for i in indices]
    if any(o.ndim != 4 for o in outs):
        raise ConfigError(f"backbone {model.hparams.backbone}: its feature points do not give spatial maps")
    return outs


def top_channels(act: torch.Tensor, k: int) -> list[int]:
    """The ``k`` channels of one CHW activation with the highest mean response."""
    return act.flatten(1).mean(1).topk(min(k, act.shape[0])).indices.tolist()


def first_conv(net: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first Conv2d that sees the RGB input (a ViT's patch embedding counts)."""
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.in_channels == 3:
            return name, mod
    raise ConfigError("see=filters: this backbone has no Conv2d on the RGB input (nothing to show as RGB tiles)")


def filter_tiles(weight: torch.Tensor) -> np.ndarray:
    """(out, 3, kh, kw) weights → (out, kh, kw, 3) tiles, each min-max scaled to 0..1 on its own."""
    w = weight.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
    lo = w.reshape(len(w), -1).min(1)[:, None, None, None]
    hi = w.reshape(len(w), -1).max(1)[:, None, None, None]
    return (w - lo) / np.maximum(hi - lo, 1e-12)


def _map_title(title: str, heat: torch.Tensor) -> str:
    """A cell title; a 1x1 map (one colour whatever its value) also gets its value written out."""
    return f"{title} = {float(heat.flatten()[0]):.2f} (1x1)" if heat.numel() == 1 else title


def _one_pixel_scale(act: torch.Tensor) -> dict[str, float]:
    """Colour limits for a 1x1 map: 0 .. the layer's largest value (one value alone would get the lowest colour)."""
    if act.shape[-2:].numel() != 1:
        return {}
    return {"vmin": min(0.0, float(act.min())), "vmax": max(float(act.max()), 1e-6)}


def run_features(cfg: DictConfig, index: plots.Index) -> None:
    """``see=features``: per layer, rows = images, columns = input | top-k channels; plus an overview."""
    ck, paths, labels, x = checkpoint_and_images(cfg, index)
    opts = cfg.see
    info = feature_points(ck.backbone)
    layers = OmegaConf.to_container(opts.layers) if opts.get("layers") is not None else None
    indices = choose_layers(info, layers)
    acts = activations(ck.model, x, indices)
    if len({info[i].get("reduction") for i in indices}) == 1 and len(indices) > 1:
        index.note(f"{ck.hp.backbone}: every layer has stride {info[indices[0]].get('reduction')} (a transformer: "
                   "tokens reshaped to a grid, class token dropped), so maps do not shrink with depth")
    k = int(opts.get("top_k") or 8)
    views = uint8_hwc(x)
    titles = [image_title(ck, p, y) for p, y in zip(paths, labels)]
    layers_out = []
    for order, (i, act) in enumerate(zip(indices, acts)):
        point = info[i]
        fig, axes = plots.grid(len(paths), 1 + k)
        for row, path in enumerate(paths):
            plots.show(axes[row, 0], views[row], titles[row])
            chans = top_channels(act[row], k)
            for col in range(k):
                ax = axes[row, col + 1]
                if col < len(chans):
                    plots.show(ax, act[row, chans[col]].numpy(), _map_title(f"ch {chans[col]}", act[row, chans[col]]),
                               cmap="viridis", **_one_pixel_scale(act[row]))
                else:
                    ax.axis("off")
        size = list(act.shape[-2:])
        name = f"features_{order:02d}_{point['module'].replace('.', '_')}"
        index.save(fig, name, f"{point['module']}: top-{k} channels (stride {point.get('reduction')}, "
                   f"{act.shape[1]} ch, {size[0]}x{size[1]})", layer=point["module"],
                   reduction=point.get("reduction"), channels=int(act.shape[1]), map_size=size)
        layers_out.append({"module": point["module"], "reduction": point.get("reduction"), "map_size": size})
    fig, axes = plots.grid(len(paths), 1 + len(acts))
    for row in range(len(paths)):
        plots.show(axes[row, 0], views[row], titles[row])
        for col, (i, act) in enumerate(zip(indices, acts), start=1):
            mean = act[row].mean(0)
            plots.show(axes[row, col], mean.numpy(), _map_title(f"{info[i]['module']} mean", mean), cmap="viridis",
                       **_one_pixel_scale(act[row]))
    index.save(fig, "features_overview", "mean activation per layer, shallow → deep")
    index.data.update(layers=layers_out, images=[str(p) for p in paths], checkpoint=str(ck.path))


def run_filters(cfg: DictConfig, index: plots.Index) -> None:
    """``see=filters``: the first conv layer's kernels as RGB tiles."""
    ck = load_checkpoint(cfg)
    name, conv = first_conv(ck.backbone)
    tiles = filter_tiles(conv.weight)[: int(cfg.see.get("max_filters") or 64)]
    cols = min(8, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    fig, axes = plots.grid(rows, cols, panel=1.2)
    for n, ax in enumerate(axes.flat):
        if n < len(tiles):
            plots.show(ax, tiles[n], f"{n}", interpolation="nearest")
        else:
            ax.axis("off")
    kh, kw = conv.kernel_size
    index.save(fig, "filters", f"{name}: {len(tiles)} of {conv.out_channels} {kh}x{kw} RGB kernels "
               "(each scaled to its own min..max)", layer=name, n_filters=len(tiles))
    index.data.update(checkpoint=str(ck.path), layer=name, kernel_size=[kh, kw])
