"""Segmentation files: mask decoding, ``images/`` + ``masks/`` pairing, the checks run up front, class names.

Split out of :mod:`visionsweep.data.segmentation` (which re-exports these names) to keep both short.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf
from PIL import Image

from visionsweep.data import scan
from visionsweep.data.builtin import COMPLETE_MARKER, SHAPES_SEG_VERSION
from visionsweep.data.images import IMAGE_EXTENSIONS
from visionsweep.errors import DataError

Pair = tuple[Path, Path]


def read_mask(path: Path) -> np.ndarray:
    """Decode a mask file into an ``H x W`` uint8 array of raw values (palette PNGs give their indices).

    Raises:
        DataError: Unreadable file, colour (RGB) mask, float mask or values above 255.
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode, arr = img.mode, np.asarray(img)
    except Exception as exc:  # Pillow raises many types
        raise DataError(f"cannot read mask '{path}' ({type(exc).__name__}): replace the file") from exc
    if arr.ndim == 3:
        rgb = arr[..., :3] if mode != "LA" else arr[..., :1]
        if rgb.shape[-1] > 1 and not (np.array_equal(rgb[..., 0], rgb[..., 1])
                                       and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError(f"mask '{path}' is an RGB colour image ({mode}) but class indices are expected: "
                            "save one channel (mode L or a palette PNG) with values 0..C-1")
        arr = rgb[..., 0]
    if arr.dtype.kind == "f":
        raise DataError(f"mask '{path}' holds floats ({mode}): save integer class indices 0..C-1")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"mask '{path}' has values up to {arr.max()}: at most 256 values are supported")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as :func:`load_rgb` returns it (EXIF rotations swap the sides); header only."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (h, w) if img.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)
    except Exception as exc:
        raise DataError(f"cannot read image '{path}' ({type(exc).__name__}): remove or replace it") from exc


def find_pairs(folder: Path) -> list[Pair]:
    """``(image, mask)`` pairs of ``folder/images`` and ``folder/masks`` (same stem; ``.png`` first)."""
    images_dir, masks_dir = folder / "images", folder / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"'{d}' is not a folder: a segmentation set needs {folder}/images and "
                            f"{folder}/masks (same file stems), optionally under train/ val/ test/")
    images, _ = scan.list_images(images_dir)
    if not images:
        raise DataError(f"no images in '{images_dir}': put the images there ({', '.join(IMAGE_EXTENSIONS)})")
    masks = {}
    for p in sorted(scan.list_images(masks_dir)[0], key=lambda p: p.suffix.lower() != ".png", reverse=True):
        masks[p.stem] = p  # .png last, so it wins over a same-stem jpg
    missing = [p for p in images if p.stem not in masks]
    if missing:
        more = f" [{len(missing) - 1} more without a mask]" if len(missing) > 1 else ""
        raise DataError(f"image '{missing[0]}' has no mask: expected '{masks_dir / missing[0].stem}.png'{more}")
    return [(p, masks[p.stem]) for p in images]


def _check_pair(pair: Pair) -> set[int]:
    """Size check of one pair; returns the mask's distinct values."""
    image, mask_path = pair
    mask = read_mask(mask_path)
    w, h = _image_size(image)
    if mask.shape != (h, w):
        raise DataError(f"mask '{mask_path}' is {mask.shape[1]}x{mask.shape[0]} but image '{image}' is "
                        f"{w}x{h}: masks must match their image pixel for pixel")
    return set(np.unique(mask).tolist())


def load_class_names(root: Path) -> list[str] | None:
    """Names of ``root/classes.yaml`` (a list, or a mapping index: name), or None without the file."""
    path = root / "classes.yaml"
    if not path.is_file():
        return None
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise DataError(f"'{path}'{where}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__}): "
                        "list the class names in index order (- background, - ...)") from None
    if isinstance(data, dict):
        try:
            index = {int(k): str(v) for k, v in data.items()}
        except ValueError:
            raise DataError(f"'{path}': keys must be class indices (0: background, 1: ...)") from None
        if sorted(index) != list(range(len(index))):
            raise DataError(f"'{path}': indices must be 0..{len(index) - 1} without gaps")
        return [index[i] for i in range(len(index))]
    if not isinstance(data, list) or not data:
        raise DataError(f"'{path}' must list the class names in index order (- background, - ...)")
    return [str(v) for v in data]


def _refuse_gaps(pairs: Sequence[Pair], values: Sequence[set[int]], seen: set[int], ignore_index: int) -> None:
    """With classes inferred from the masks (0..max value), refuse values that leave unused indices.

    A stray value (a 200 among 0/1 masks) would otherwise make 201 classes, most of them never seen,
    and a meaningless mIoU.

    Raises:
        DataError: Naming a mask holding the first value above the gap, and the fixes.
    """
    used = sorted(v for v in seen if v != ignore_index)
    if not used or used[-1] + 1 == len(used):
        return
    gap = next(i for i, v in enumerate(used) if v != i)  # the first unused index
    stray = used[gap]
    mask = next(m for (_, m), vals in zip(pairs, values) if stray in vals)
    raise DataError(
        f"mask '{mask}' has value {stray}, but no mask uses {gap}" + (f"..{stray - 1}" if stray - 1 > gap else "")
        + f" (values found: {', '.join(map(str, used[:8]))}{' ...' if len(used) > 8 else ''}): classes are "
        "read as 0..max value, so fix the mask, list the classes (data.classes=[...] or classes.yaml), or "
        f"mark it with data.ignore_index={stray}"
    )


def builtin_mismatch(root: Path, name: str, options: dict) -> str | None:
    """How built-in set ``root`` differs from what ``options`` would write: ``"version"``, ``"options"`` or None.

    ``"version"``: another generator version (or an unreadable marker) drew it; ``"options"``: the same
    generator with other options (e.g. a small set a test wrote on purpose). A folder whose marker names
    another set is not ours and never differs.
    """
    try:
        marker = json.loads((root / COMPLETE_MARKER).read_text() or "{}")
    except (OSError, ValueError):
        return "version"
    if marker.get("name") != name:
        return None
    if name == "shapes_seg" and marker.get("version") != SHAPES_SEG_VERSION:
        return "version"
    norm = lambda v: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v  # noqa: E731
    return "options" if any(norm(marker.get(k)) != norm(v) for k, v in options.items()) else None
