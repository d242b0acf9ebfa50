"""Albumentations pipelines built from the ``augmentation`` config group.

A preset (``conf/augmentation/<name>.yaml``) is a mapping with ``name``, ``resize_first`` and ``train``, a
list of transforms written Hydra-style (``_target_`` plus the class's own arguments; nested transform lists,
e.g. ``OneOf.transforms``, are built recursively). Mistakes a user can make in a preset become one-line
:class:`~visionsweep.errors.ConfigError` messages naming the preset and the bad thing.

Randomness (albumentations 2.0.8): ``A.Compose`` owns private ``numpy``/``random`` generators seeded from its
``seed`` argument; global seeding (``np.random.seed``, ``seed_everything``) does not reach them, and
``seed=None`` means fresh OS entropy. :func:`build_pipelines` therefore always passes a seed, taken from
``torch.initial_seed()`` when none is given, so runs with the same global seed augment identically.
Per-sample seeding inside DataLoader workers is :mod:`visionsweep.data.seeding`'s job (the one mechanism
for samples); the seed here only makes the pipeline reproducible where it is called directly.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before albumentations is imported anywhere

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig, ListConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from visionsweep.errors import ConfigError  # noqa: E402
from visionsweep.utils.atomic import atomic_write, json_default  # noqa: E402

__all__ = ["INTERPOLATIONS", "build_pipelines", "pipeline_to_dict", "save_pipelines"]

INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
_PRESET_KEYS = ("name", "resize_first", "train")


def _transform_names() -> list[str]:
    """Names of the 2-D transform classes albumentations exports (for "did you mean" hints)."""
    names = []
    for name in dir(A):
        obj = getattr(A, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, (A.BasicTransform, A.BaseCompose))
            and not issubclass(obj, A.Transform3D)
            and not name.startswith("_")
        ):
            names.append(name)
    return names


def _short(text: str, limit: int = 200) -> str:
    """First non-empty line of ``text``, cut to ``limit`` characters (messages must stay one line)."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _describe_error(exc: BaseException) -> str:
    """One short line for an exception raised while constructing a transform."""
    cause = exc.__cause__ or exc
    errors = getattr(cause, "errors", None)
    if callable(errors):  # pydantic ValidationError (albumentations re-raises it as ValueError(str(e)))
        try:
            first = errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            msg = f"{loc}: {first['msg']}" if loc else first["msg"]
            if "input" in first and not isinstance(first["input"], Mapping) and "got" not in msg:
                msg += f" (got {first['input']!r})"
            return _short(msg)
        except Exception:  # noqa: BLE001 - fall back to the plain text below
            pass
    return _short(f"{type(cause).__name__}: {cause}")


def _resolve_class(target: Any, preset: str) -> type:
    """Import the class a ``_target_`` names; bare names are looked up in albumentations."""
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(f"augmentation '{preset}': _target_ must be a class path string, got {target!r}")
    module_name, _, attr = target.strip().rpartition(".")
    cls = None
    try:
        cls = getattr(importlib.import_module(module_name or "albumentations"), attr, None)
    except ImportError:
        pass
    if cls is None:
        close = difflib.get_close_matches(attr, _transform_names(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see dir(albumentations) for the names)"
        raise ConfigError(f"augmentation '{preset}': unknown transform '{target}'{hint}")
    if not (isinstance(cls, type) and issubclass(cls, (A.BasicTransform, A.BaseCompose))):
        raise ConfigError(f"augmentation '{preset}': '{target}' is not an albumentations transform class")
    return cls


def _check_arguments(cls: type, kwargs: dict[str, Any], preset: str) -> None:
    """Reject unknown and missing keyword arguments (albumentations 2 only *warns* about unknown ones)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    if getattr(cls.__init__, "__name__", "") == "custom_init":  # albumentations' validating wrapper
        valid.append("strict")
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            shown = ", ".join(v for v in valid if v != "strict")
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {shown})"
            raise ConfigError(f"augmentation '{preset}': bad argument for {cls.__name__}: unexpected '{key}'{hint}")
    for name, p in params.items():
        required = p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        if name != "self" and required and name not in kwargs:
            raise ConfigError(f"augmentation '{preset}': bad argument for {cls.__name__}: missing '{name}'")


def _build(node: Any, preset: str, where: str) -> Any:
    """Build one config value: a ``_target_`` mapping becomes a transform, lists are built element-wise."""
    if isinstance(node, list):
        return [_build(item, preset, f"{where}[{i}]") for i, item in enumerate(node)]
    if not isinstance(node, dict) or "_target_" not in node:
        return node
    kwargs = dict(node)
    cls = _resolve_class(kwargs.pop("_target_"), preset)
    for meta in [k for k in kwargs if k.startswith("_") and k.endswith("_")]:  # Hydra's _partial_, _args_, ...
        raise ConfigError(f"augmentation '{preset}': {where}: Hydra key '{meta}' is not supported here")
    _check_arguments(cls, kwargs, preset)
    kwargs = {k: _build(v, preset, f"{where}.{k}") for k, v in kwargs.items()}
    if getattr(cls.__init__, "__name__", "") == "custom_init":
        # strict=True turns albumentations' "warn and fall back to defaults" paths into exceptions.
        kwargs.setdefault("strict", True)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any construction failure is a bad argument
        raise ConfigError(f"augmentation '{preset}': bad argument for {cls.__name__}: {_describe_error(exc)}") from exc


def _as_dict(cfg: Any) -> dict[str, Any]:
    """Plain, resolved dict of a preset given as DictConfig or mapping."""
    try:
        if isinstance(cfg, (DictConfig, ListConfig)):
            data = OmegaConf.to_container(cfg, resolve=True)
        elif isinstance(cfg, Mapping):
            data = OmegaConf.to_container(OmegaConf.create(dict(cfg)), resolve=True)
        else:
            data = cfg
    except OmegaConfBaseException as exc:
        name = cfg.get("name", "?") if hasattr(cfg, "get") else "?"
        raise ConfigError(f"augmentation '{name}': cannot resolve the preset: {_short(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"augmentation preset must be a mapping (name, resize_first, train): {type(cfg).__name__}")
    return data


def _eval_transforms(image_size: int, crop_pct: float, interpolation: int) -> list[A.BasicTransform]:
    # max() keeps crop_pct > 1 from asking for a crop larger than the resized image.
    short_side = max(image_size, round(image_size / crop_pct))
    return [
        A.SmallestMaxSize(max_size=short_side, interpolation=interpolation),
        A.CenterCrop(height=image_size, width=image_size),
    ]


def _check_output(pipeline: A.Compose, which: str, preset: str, image_size: int) -> None:
    """Run ``pipeline`` once on a random image and require an ``image_size``-square uint8 RGB output."""
    h, w = 2 * image_size, max(1, round(1.5 * image_size))
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    try:
        out = pipeline(image=image)["image"]
    except Exception as exc:  # noqa: BLE001
        msg = f"{which} pipeline fails on a {h}x{w} image: {_describe_error(exc)}"
        raise ConfigError(f"augmentation '{preset}': {msg}") from exc
    if out.shape != (image_size, image_size, 3) or out.dtype != np.uint8:
        got = "x".join(str(s) for s in out.shape[:2]) + ("" if out.dtype == np.uint8 else f" {out.dtype}")
        raise ConfigError(
            f"augmentation '{preset}': {which} pipeline gives {got}, expected {image_size}x{image_size} uint8 "
            "(end the preset with a crop/resize to data.image_size, or set resize_first: true)"
        )


def build_pipelines(
    cfg: DictConfig | Mapping[str, Any],
    image_size: int,
    crop_pct: float = 1.0,
    interpolation: str | int = "bilinear",
    seed: int | None = None,
) -> tuple[A.Compose, A.Compose]:
    """Build the (train, eval) albumentations pipelines of one augmentation preset.

    Eval is always ``SmallestMaxSize(round(image_size / crop_pct))`` + ``CenterCrop(image_size)``, never
    augmented. Train is that same resize + crop when ``resize_first`` is true, followed by the preset's
    ``train`` transforms. Both pipelines are checked once on a random image to give ``image_size``-square uint8.

    Args:
        cfg: The preset (``name``, ``resize_first``, ``train``); a DictConfig (resolved here) or a dict.
        image_size: Side of the square output, usually timm's ``input_size[-1]``.
        crop_pct: timm's centre-crop fraction; the short side is first resized to ``image_size / crop_pct``.
        interpolation: Resize interpolation for the eval view: "bilinear", "bicubic", "nearest", "area",
            "lanczos" (timm gives "bilinear"/"bicubic") or a cv2 flag.
        seed: Seed of the pipelines' private generators. None takes ``torch.initial_seed()`` (set by
            ``seed_everything``) so identical global seeds give identical augmentations in the main process;
            DataLoader workers reseed per sample (:func:`visionsweep.data.seeding.seed_sample`).

    Returns:
        The train and eval ``A.Compose`` pipelines (picklable).

    Raises:
        ConfigError: A one-line message naming the preset and the bad key, transform or argument.
    """
    data = _as_dict(cfg)
    preset = str(data.get("name") or "<unnamed>")
    unknown = sorted(set(data) - set(_PRESET_KEYS))
    if unknown:
        raise ConfigError(
            f"augmentation '{preset}': unknown key(s) {', '.join(unknown)} (allowed: {', '.join(_PRESET_KEYS)})"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ConfigError(f"augmentation '{preset}': image_size must be a positive int, got {image_size!r}")
    image_size = int(image_size)
    if not isinstance(crop_pct, (int, float)) or not crop_pct > 0:
        raise ConfigError(f"augmentation '{preset}': crop_pct must be > 0, got {crop_pct!r}")
    if isinstance(interpolation, str):
        if interpolation.lower() not in INTERPOLATIONS:
            raise ConfigError(
                f"augmentation '{preset}': unknown interpolation '{interpolation}' (use {', '.join(INTERPOLATIONS)})"
            )
        interp = INTERPOLATIONS[interpolation.lower()]
    else:
        interp = int(interpolation)
    resize_first = data.get("resize_first", False)
    if not isinstance(resize_first, bool):
        raise ConfigError(f"augmentation '{preset}': resize_first must be true or false, got {resize_first!r}")
    train_cfg = data.get("train", [])
    if train_cfg is None:
        train_cfg = []
    if not isinstance(train_cfg, list):
        kind = type(train_cfg).__name__
        raise ConfigError(f"augmentation '{preset}': train must be a list of transforms, got {kind}")
    for i, item in enumerate(train_cfg):
        if not isinstance(item, dict) or "_target_" not in item:
            raise ConfigError(f"augmentation '{preset}': train[{i}] must be a mapping with _target_, got {item!r}")

    if seed is None:
        import torch  # lazy: only needed to follow the global seed

        seed = torch.initial_seed()
    seed = int(seed) % 2**32  # numpy/random accept any int, but keep it in the classic 32-bit range

    with warnings.catch_warnings():
        # Unknown kwargs are already errors (see _check_arguments); the duplicate warning is noise.
        warnings.filterwarnings("ignore", message=r"Argument\(s\) .* are not valid for transform")
        train_list = _build(train_cfg, preset, "train")
    head = _eval_transforms(image_size, crop_pct, interp) if resize_first else []
    train = A.Compose(head + train_list, seed=seed)
    evaluate = A.Compose(_eval_transforms(image_size, crop_pct, interp), seed=seed)

    _check_output(evaluate, "eval", preset, image_size)
    _check_output(train, "train", preset, image_size)
    train.set_random_seed(seed)  # the check consumed random draws: restart the stream
    return train, evaluate


def pipeline_to_dict(pipeline: A.BasicTransform | A.BaseCompose) -> dict[str, Any]:
    """Serialisable description of a pipeline (``A.to_dict``: class names and every argument).

    Args:
        pipeline: A transform or Compose.

    Returns:
        A JSON-compatible dict (``A.from_dict`` rebuilds the pipeline from it).
    """
    return A.to_dict(pipeline)


def save_pipelines(train: A.Compose, evaluate: A.Compose, path: str | os.PathLike[str]) -> Path:
    """Write both pipelines to one JSON file so a run directory records its exact transforms.

    Args:
        train: The train pipeline.
        evaluate: The eval pipeline.
        path: Destination file (parent folders are created).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"train": pipeline_to_dict(train), "eval": pipeline_to_dict(evaluate)}
    atomic_write(path, json.dumps(payload, indent=2, default=json_default) + "\n")
    return path
