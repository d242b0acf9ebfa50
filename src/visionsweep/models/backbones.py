"""timm backbones: name checks, input config (size, mean, std) and creation with weights.

Every timm model name works. Weights come from the hub (``pretrained=True``, online) or from a
local state-dict file (``pretrained_file``), which is how offline machines and tests load them.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch.nn as nn

from visionsweep.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputConfig:
    """What a backbone expects as input; filled from timm's pretrained config unless overridden."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str


def check_backbone(name: str) -> None:
    """Raise a ConfigError with close timm names when ``name`` is not a timm model.

    Args:
        name: timm model name, optionally with a pretrained tag (``resnet34.a1_in1k``).
    """
    if timm.is_model(name):
        return
    arch = name.split(".")[0]
    names = timm.list_models()
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    close += [n for n in names if arch and arch in n and n not in close][: 5 - len(close)]
    hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
    raise ConfigError(f"model.backbone '{name}' is not a timm model{hint}")


def resolve_input_config(
    name: str,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> InputConfig:
    """timm's data config for ``name``, with any value given here taking precedence.

    Args:
        name: timm model name.
        image_size: square input side; None takes the backbone's (224 for most).
        mean: per-channel mean in [0, 1]; None takes the backbone's.
        std: per-channel std; None takes the backbone's.
        crop_pct: eval centre-crop fraction; None takes the backbone's.
        interpolation: resize interpolation; None takes the backbone's.

    Returns:
        The resolved :class:`InputConfig`.
    """
    check_backbone(name)
    cfg = timm.data.resolve_data_config({}, pretrained_cfg=_pretrained_cfg(name))
    return InputConfig(
        image_size=int(image_size or cfg["input_size"][-1]),
        mean=tuple(float(v) for v in (mean or cfg["mean"])),
        std=tuple(float(v) for v in (std or cfg["std"])),
        crop_pct=float(crop_pct or cfg.get("crop_pct", 0.875)),
        interpolation=str(interpolation or cfg.get("interpolation", "bilinear")),
    )


def _pretrained_cfg(name: str) -> dict:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the Hugging Face hub answers quickly; False offline (never hangs for long)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    image_size: int | None = None,
    **kwargs,
) -> nn.Module:
    """Create a timm classifier with ``num_classes`` outputs.

    Args:
        name: timm model name.
        num_classes: size of the classifier head (re-initialised when weights have another size).
        pretrained: load timm's hub weights (needs the network; fails fast offline).
        pretrained_file: local ``.pth``/``.safetensors`` state dict to load instead of the hub.
        image_size: input side for models built for a fixed size (ViT-like); ignored by CNNs.
        **kwargs: passed to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``...).

    Returns:
        The model.
    """
    check_backbone(name)
    if pretrained_file:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.pretrained_file '{pretrained_file}' does not exist")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path.resolve())))
    elif pretrained:
        if not hub_reachable():
            raise ConfigError(
                f"model.pretrained=true needs the hub weights of '{name}' but the hub cannot be "
                "reached: run online once, or give a local file with model.pretrained_file=/path/weights.pth"
            )
        kwargs["pretrained"] = True
    try:
        return timm.create_model(name, num_classes=num_classes, img_size=image_size, **kwargs)
    except TypeError as e:  # CNNs take any input size and have no img_size argument
        if "img_size" not in str(e):
            raise ConfigError(f"model '{name}': {str(e).splitlines()[0]}") from e
        return timm.create_model(name, num_classes=num_classes, **kwargs)
