"""timm backbones: name checks, input config (size, mean, std) and creation with weights.

Every timm model name works. Weights come from the hub (``pretrained=True``, online) or from a
local state-dict file (``pretrained_file``), which is how offline machines and tests load them; a
missing file with a built-in name (``resnet34_digits0-6.safetensors``) is pre-trained once first
(:mod:`visionsweep.models.builtin_weights`).
"""

from __future__ import annotations

import difflib
import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models import group_parameters

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


AUTO_SIZE_FLOOR = 16  # data.image_size=auto: below 16 px resnet34 on the 8x8 digits measured worse (12, 8 px)


def smallest_input_size(name: str, floor: int = AUTO_SIZE_FLOOR, default: int = 224) -> int:
    """The smallest square side ``>= floor`` that ``name`` runs on and sees whole (``data.image_size=auto``):
    for tiny images (8x8 digits) more pixels add compute, not detail. resnet34 16, vgg19 32, ViT-16 16."""
    if not _probe(name, floor)[0]:  # bisect for the smallest side it runs on (larger ones run too)
        if not _probe(name, default)[0]:
            return default  # not checkable on the meta device: its own side is known to work
        lo, hi = floor, default
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _probe(name, mid)[0] else (mid, hi)
        floor = hi
    for size in range(floor, max(floor, default) + 1):  # then the first its stem's windows cover whole
        ok, stem = _probe(name, size)
        if ok and (stem is None or _reach(stem, size) >= size - 1):
            return size
    return default


def resolve_input_config(
    name: str,
    image_size: int | str | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    check_size: bool = True,
) -> InputConfig:
    """timm's data config for ``name``, with any value given here taking precedence.

    Args:
        name: timm model name.
        image_size: square input side; None takes the backbone's (224 for most); ``auto`` the smallest side
            of at least 16 px it takes whole (:func:`smallest_input_size`), for tiny images.
        mean: per-channel mean in [0, 1]; None takes the backbone's.
        std: per-channel std; None takes the backbone's.
        crop_pct: eval centre-crop fraction; None takes the backbone's.
        interpolation: resize interpolation; None takes the backbone's.
        check_size: refuse an ``image_size`` the model cannot take or cannot use whole
            (:func:`check_input_size`); a segmenter that pads its input to the stride can skip it.

    Returns:
        The resolved :class:`InputConfig`.

    Raises:
        ConfigError: Unknown backbone, or an input size the backbone cannot use.
    """
    check_backbone(name)
    cfg = timm.data.resolve_data_config({}, pretrained_cfg=_pretrained_cfg(name))
    if image_size == "auto":
        image_size = smallest_input_size(name, default=int(cfg["input_size"][-1]))
        log.info("data.image_size=auto: %d px (the smallest side >= %d that %s takes whole)", image_size,
                 AUTO_SIZE_FLOOR, name)
    elif image_size and check_size:
        check_input_size(name, int(image_size), int(cfg["input_size"][-1]))
    return InputConfig(
        image_size=int(image_size or cfg["input_size"][-1]),
        mean=tuple(float(v) for v in (mean or cfg["mean"])),
        std=tuple(float(v) for v in (std or cfg["std"])),
        crop_pct=float(crop_pct or cfg.get("crop_pct", 0.875)),
        interpolation=str(interpolation or cfg.get("interpolation", "bilinear")),
    )


def check_input_size(name: str, size: int, default: int = 224) -> None:
    """Refuse an input side the backbone fails on, or whose last pixels its first layer never sees.

    Checked on a copy of the model on PyTorch's meta device (shapes only: no weights, no compute,
    milliseconds), before anything is built or trained:

    * too small: the forward pass fails (VGG's five 2x2 pools need 32 px);
    * not used whole: the stem's windows stop short of the image's edge (a ViT's 16x16 patches on
      30 px see pixels 0-15 only; a ConvNeXt's 4x4 stem drops the last rows of 34 px).

    A model that cannot be built on the meta device (rare custom layers) is not checked.

    Args:
        name: timm model name.
        size: ``data.image_size``.
        default: the backbone's own input side (known to work).

    Raises:
        ConfigError: Naming the size, the model and a size that works.
    """
    ok, stem = _probe(name, size)
    if not ok:
        if not _probe(name, default)[0]:
            log.debug("input size check of %s skipped: the model does not run on the meta device", name)
            return
        lo, hi = size, default  # lo fails, hi works: the smallest working side in between
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _probe(name, mid)[0] else (mid, hi)
        raise ConfigError(f"data.image_size={size} is too small for {name} (needs ≥ {hi}): "
                          f"set data.image_size={hi} or more")
    if stem is None or _reach(stem, size) >= size - 1:
        return
    kernel, stride, padding, dilation = stem
    fits = [m for m in range(max(1, size - stride), size + stride + 1) if _reach(stem, m) >= m - 1]
    best = min(fits, key=lambda m: (abs(m - size), -m), default=None)
    hint = f" (try {best})" if best else ""
    unseen = size - 1 - _reach(stem, size)
    if kernel == stride and padding == 0 and dilation == 1:
        raise ConfigError(f"data.image_size={size} must be a multiple of {stride} for {name}{hint}: its "
                          f"{kernel}x{kernel} patches never see the last {unseen} rows and columns")
    raise ConfigError(f"data.image_size={size} does not fit {name}{hint}: its first layer ({kernel}x{kernel}, "
                      f"stride {stride}) never sees the last {unseen} rows and columns")


def _reach(stem: tuple[int, int, int, int], size: int) -> int:
    """Index of the last input row the stem's windows touch (floor-mode output, as PyTorch computes)."""
    kernel, stride, padding, dilation = stem
    span = dilation * (kernel - 1)
    out = (size + 2 * padding - span - 1) // stride + 1
    return (out - 1) * stride - padding + span


@functools.lru_cache(maxsize=128)
def _probe(name: str, size: int) -> tuple[bool, tuple[int, int, int, int] | None]:
    """Run ``name`` on a meta ``1x3xSxS`` input: (it works, the first conv/pool's k, s, p, d along H)."""
    stem: list[tuple[int, int, int, int]] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if stem:
            return
        pad = module.padding
        if isinstance(pad, str) or "Same" in type(module).__name__ or getattr(module, "ceil_mode", False):
            stem.append((1, 1, 0, 1))  # "same" padding, ceil mode: the windows always reach the edge
            return
        first = lambda v: int(v[0] if isinstance(v, (tuple, list)) else v)  # noqa: E731
        stem.append((first(module.kernel_size), first(module.stride), first(pad),
                     first(getattr(module, "dilation", 1))))

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            try:
                model = timm.create_model(name, num_classes=2, img_size=size)
            except TypeError as e:  # CNNs take any size and have no img_size argument
                if "img_size" not in str(e):
                    raise
                model = timm.create_model(name, num_classes=2)
    except Exception as e:  # noqa: BLE001 - unknown to the meta device: not checked here
        log.debug("meta copy of %s at %d px: %s", name, size, e)
        return False, None
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, 3, size, size, device="meta"))
    except Exception:  # noqa: BLE001 - "Output size is too small", "Kernel size can't be greater" ...
        return False, None
    return True, stem[0] if stem else None


def _pretrained_cfg(name: str) -> dict:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def hub_weights_cached(name: str) -> bool:
    """True when the hub weights timm would load for ``name`` are already in the local Hugging Face cache.

    timm then loads them offline too (``HF_HUB_OFFLINE=1`` reads the cache), so no network is needed.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name[3:] if name.startswith("tu-") else name)
    except Exception:  # an unknown name, or a timm without this helper: let timm itself decide
        return False
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    files = [getattr(cfg, "hf_hub_filename", None), *WEIGHT_FILES] if repo else []
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files if f)


def hub_reachable(name: str | None = None, timeout: float = 2.0) -> bool:
    """True when ``name``'s hub weights can be had: in the local cache, or the hub answers quickly.

    Offline (``HF_HUB_OFFLINE=1``, huggingface_hub's own switch) only the cache counts; online a failed
    connection answers in ``timeout`` seconds instead of timm's 46 s of retries.
    """
    if name and hub_weights_cached(name):
        return True
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
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
        # imported here: `python -m visionsweep.models.builtin_weights` must not be imported before it runs
        from visionsweep.models.builtin_weights import ensure_weights

        if not ensure_weights(path):  # a built-in name (<backbone>_digits<a>-<b>) is pre-trained once here
            raise ConfigError(
                f"model.pretrained_file '{pretrained_file}' does not exist (write one from a trained "
                "checkpoint: python -m visionsweep.export ckpt_path=<run>/checkpoints/last.ckpt "
                f"format=state_dict output={pretrained_file})")
    elif pretrained:
        if not hub_reachable(name):
            raise ConfigError(
                f"model.pretrained=true needs the hub weights of '{name}' but the hub cannot be "
                "reached: run online once, or give a local file with model.pretrained_file=/path/weights.pth"
            )
        kwargs["pretrained"] = True
    try:
        model = timm.create_model(name, num_classes=num_classes, img_size=image_size, **kwargs)
    except TypeError as e:  # CNNs take any input size and have no img_size argument
        if "img_size" not in str(e):
            raise ConfigError(f"model '{name}': {str(e).splitlines()[0]}") from e
        model = timm.create_model(name, num_classes=num_classes, **kwargs)
    if pretrained_file:
        model.weights_report = load_weights_file(model, path)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors``/``.pth``/``.pt``/``.bin`` file or of a visionsweep ``.ckpt``.

    Wrappers are unpacked (``state_dict``/``model``/``state_dict_ema`` keys) and the prefixes of our
    own LightningModule (``net.``) or of DDP (``module.``) are removed, so a training checkpoint works
    as a pretrained file too.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"model.pretrained_file '{path}' cannot be read as a state dict "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"model.pretrained_file '{path}' holds no state dict (a mapping name → tensor)")
    for prefix in ("net.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights_file(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a local state dict into ``model``; the classifier and tensors whose shape differs stay new.

    Args:
        model: a timm model.
        path: ``.safetensors``/``.pth``/``.ckpt`` file (see :func:`read_state_dict`).

    Returns:
        A report: ``file``, ``loaded`` (count), ``missing``, ``unexpected`` and ``reinitialised`` key
        names (logged too; the classifier is re-initialised for the data set's classes).
    """
    state = read_state_dict(path)
    own = model.state_dict()
    # the classifier is always new (fastai/timm fine-tune semantics: the file's classes are not ours)
    head = head_parameter_names(model)
    reset = [k for k, v in state.items() if k in head or (k in own and own[k].shape != v.shape)]
    kept = {k: v for k, v in state.items() if k not in reset}
    result = model.load_state_dict(kept, strict=False)
    loaded = len([k for k in kept if k in own])
    if loaded == 0:
        raise ConfigError(f"model.pretrained_file '{path}' has no tensor that fits "
                          f"{type(model).__name__} (is it for another backbone?)")
    missing = [k for k in result.missing_keys if k not in reset and k not in head]
    report = {"file": str(path), "loaded": loaded, "missing": missing,
              "unexpected": list(result.unexpected_keys), "reinitialised": sorted(reset)}
    log.info("pretrained_file %s: %d tensors loaded; re-initialised (the head, or shape differs): %s", path,
             loaded, ", ".join(sorted(reset)) or "none")
    for kind in ("missing", "unexpected"):
        if report[kind]:
            names = report[kind]
            log.warning("pretrained_file %s: %d %s keys: %s%s", path, len(names), kind,
                        ", ".join(names[:8]), " ..." if len(names) > 8 else "")
    return report


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names (in ``model.named_parameters()``) of the classifier that a fine-tune trains first."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        raise ConfigError(f"{type(model).__name__} has no get_classifier(): cannot tell its head from its body")
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names by depth: timm's coarse groups (stem, stages...) then the classifier last.

    Discriminative learning rates and freezing work on these groups, as fastai's splitters do.
    """
    head = head_parameter_names(model)
    names = [n for n, _ in model.named_parameters()]
    if hasattr(model, "group_matcher"):
        grouped = group_parameters(model, model.group_matcher(coarse=True))
        groups = [[n for n in g if n not in head] for _, g in sorted(grouped.items())]
    else:  # not a timm model: the whole body is one group
        groups = [[n for n in names if n not in head]]
    groups = [g for g in groups if g]
    return groups + [[n for n in names if n in head]]
