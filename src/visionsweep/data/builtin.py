"""Data sets that need no download: exported from installed packages or generated.

Each set is written once as a real folder data set (``root/<class>/<file>``) so the same code path
as user data is exercised. Writing goes to a hidden temporary directory next to ``root`` that is
renamed into place when whole, with a ``.complete`` marker inside, so several sweep jobs starting
at once never see (or produce) a half-written set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from visionsweep.data.images import IMAGE_EXTENSIONS
from visionsweep.errors import ConfigError, DataError

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
SHAPE_CLASSES = ("circle", "square", "triangle", "diamond", "cross", "star")


def is_complete(root: str | Path) -> bool:
    """Tell whether ``root`` holds a fully written built-in data set.

    Args:
        root: Data set folder.

    Returns:
        True when the ``.complete`` marker exists.
    """
    return (Path(root) / COMPLETE_MARKER).is_file()


def _write_atomically(root: Path, name: str, params: dict, fill: Callable[[Path], None]) -> Path:
    """Build a data set in a temp dir next to ``root``, then rename it into place.

    If another process finishes first, its copy is kept and ours is discarded.
    """
    root = Path(root).expanduser()
    if is_complete(root):
        return root
    if root.exists() and not root.is_dir():
        raise DataError(f"data root '{root}' is a file, not a folder: set data.root to a folder path")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        fill(tmp)
        marker = {"name": name, **params}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n")
        try:
            # rename(2) replaces an empty directory but fails on a non-empty one, which is
            # exactly the "someone else already wrote it" case.
            os.replace(tmp, root)
        except OSError:
            if not is_complete(root):
                raise DataError(
                    f"data root '{root}' exists but is not a complete '{name}' data set "
                    f"(no {COMPLETE_MARKER} marker): delete it or set data.root to another folder"
                ) from None
            log.debug("another process wrote %s first; keeping theirs", root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def export_digits(root: str | Path) -> Path:
    """Export scikit-learn's 1,797 8x8 handwritten digits as ``root/<digit>/<index:04d>.png``.

    Images stay 8x8 grayscale (values 0..16 scaled to 0..255); resizing is the augmentation
    pipeline's job. Idempotent and safe when several processes call it at once.

    Args:
        root: Destination folder (created).

    Returns:
        ``root`` as a Path.
    """
    from sklearn.datasets import load_digits  # deferred: sklearn import is slow and rarely needed

    def fill(tmp: Path) -> None:
        digits = load_digits()
        images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        for label in range(10):
            (tmp / str(label)).mkdir()
        for index, (image, label) in enumerate(zip(images, digits.target)):
            Image.fromarray(image).save(tmp / str(int(label)) / f"{index:04d}.png")

    return _write_atomically(Path(root), "digits", {"n_files": 1797}, fill)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy, textured background: base colour + smooth blobs + pixel noise."""
    base = rng.uniform(0, 255, size=3)
    coarse = rng.normal(0.0, 35.0, size=(max(2, size // 8), max(2, size // 8), 3)).astype(np.float32)
    texture = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0.0, 12.0, size=(size, size, 3))
    img = np.clip(base + texture + noise, 0, 255)
    return img, base


def _shape_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from the background mean that the shape stays visible."""
    for _ in range(100):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - background).sum() >= 180:
            break
    else:  # practically unreachable: fall back to the complementary colour
        colour = 255.0 - background
    return tuple(int(c) for c in colour)


def _shape_points(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Polygon vertices of a shape of half-size ``r`` around ``(cx, cy)``."""
    if kind == "square":
        angles = np.array([45, 135, 225, 315]) + angle
        radii = np.full(4, r * np.sqrt(2))
    elif kind == "diamond":
        angles = np.array([0, 90, 180, 270]) + angle
        radii = np.full(4, r)
    elif kind == "triangle":
        angles = np.array([-90, 30, 150]) + angle
        radii = np.full(3, r * 1.15)
    elif kind == "star":
        angles = np.arange(10) * 36.0 - 90 + angle
        radii = np.where(np.arange(10) % 2 == 0, r * 1.1, r * 0.45)
    elif kind == "cross":
        w = r / 3.0
        local = np.array(
            [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
             (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        )
        t = np.deg2rad(angle)
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        return np.round(local @ rot.T + (cx, cy)).astype(np.int32)
    else:  # pragma: no cover - guarded by the caller
        raise ConfigError(f"unknown shape '{kind}': choose from {', '.join(SHAPE_CLASSES)}")
    t = np.deg2rad(angles)
    pts = np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], axis=1)
    return np.round(pts).astype(np.int32)


def render_shape(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Draw one filled shape (side ~30-60 % of the image) on a textured background.

    Args:
        rng: Random generator (consumed deterministically).
        kind: One of :data:`SHAPE_CLASSES`.
        size: Image side in pixels.

    Returns:
        ``uint8`` RGB array of shape ``(size, size, 3)``.
    """
    img, base = _background(rng, size)
    colour = _shape_colour(rng, base)
    r = rng.uniform(0.15, 0.30) * size  # half-size, so the shape spans 30-60 % of the side
    margin = r * 1.25 + 1  # rotated square corners reach ~1.22 r
    cx = rng.uniform(margin, max(margin, size - margin))
    cy = rng.uniform(margin, max(margin, size - margin))
    angle = rng.uniform(-10.0, 10.0)  # small tilt: keeps square and diamond distinct
    canvas = np.ascontiguousarray(img.astype(np.uint8))
    _draw_shape(canvas, kind, cx, cy, r, angle, colour, cv2.LINE_AA)
    return canvas


def _draw_shape(canvas: np.ndarray, kind: str, cx: float, cy: float, r: float, angle: float,
                colour: tuple[int, ...] | int, line_type: int) -> None:
    """Fill one shape into ``canvas`` in place (image or mask: same pixels for the same arguments)."""
    if kind == "circle":
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), int(round(r)), colour, -1, line_type)
    else:
        pts = _shape_points(kind, cx, cy, r, angle)
        cv2.fillPoly(canvas, [pts], colour, line_type)


def write_shapes(
    root: str | Path,
    n_per_class: int = 40,
    size: int = 48,
    classes: Sequence[str] = ("circle", "square", "triangle"),
    seed: int = 0,
    ext: str = ".png",
) -> Path:
    """Generate a clearly separable shape-classification folder set ``root/<shape>/<i:04d><ext>``.

    Deterministic for a given seed and arguments. Like :func:`export_digits` it is written
    atomically and left alone once ``root/.complete`` exists (even if the arguments differ).

    Args:
        root: Destination folder (created).
        n_per_class: Images per class.
        size: Image side in pixels.
        classes: Shape names, a subset of :data:`SHAPE_CLASSES`.
        seed: Random seed.
        ext: File extension, one of :data:`IMAGE_EXTENSIONS` (JPEG is lossy but works).

    Returns:
        ``root`` as a Path.

    Raises:
        ConfigError: Unknown shape name, extension, or non-positive sizes.
    """
    classes = tuple(classes)
    unknown = [c for c in classes if c not in SHAPE_CLASSES]
    if unknown or len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(
            f"shapes classes {list(classes)} invalid: give at least two distinct names from "
            f"{', '.join(SHAPE_CLASSES)}"
        )
    ext = ext if ext.startswith(".") else f".{ext}"
    if ext.lower() not in IMAGE_EXTENSIONS:
        raise ConfigError(f"shapes ext '{ext}' unknown: choose from {', '.join(IMAGE_EXTENSIONS)}")
    if n_per_class < 1 or size < 8:
        raise ConfigError(f"shapes need n_per_class >= 1 and size >= 8 (got {n_per_class}, {size})")

    def fill(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for kind in classes:
            (tmp / kind).mkdir()
            for i in range(n_per_class):
                image = render_shape(rng, kind, size)
                Image.fromarray(image).save(tmp / kind / f"{i:04d}{ext}")

    params = {"n_per_class": n_per_class, "size": size, "classes": list(classes), "seed": seed, "ext": ext}
    return _write_atomically(Path(root), "shapes", params, fill)


def write_shapes_multi(
    root: str | Path,
    n_images: int = 1500,
    size: int = 64,
    classes: Sequence[str] = ("circle", "square", "triangle"),
    presence: float = 0.5,
    seed: int = 0,
) -> Path:
    """Generate a multi-label shapes set: ``root/images/<i:04d>.png`` + ``root/labels.csv`` (``path,labels``).

    Each class appears in an image with probability ``presence``, independently (so 0 to ``len(classes)``
    shapes; an image may hold none), each in its own quadrant of the image with a random size, tilt,
    colour and offset, so shapes never cover each other and the labels are exact. ``labels`` lists the
    shapes present, separated by one space (empty for none): ``task=multilabel data=shapes_multi`` reads it
    with ``data.label_sep=" "``. Written atomically, like :func:`write_shapes`.

    Args:
        root: Destination folder (created).
        n_images: Number of images.
        size: Image side in pixels.
        classes: Shape names, at most four, from :data:`SHAPE_CLASSES`.
        presence: Chance that a class is in an image.
        seed: Random seed.

    Returns:
        ``root`` as a Path.

    Raises:
        ConfigError: Unknown shape name, more than four, or non-positive sizes.
    """
    classes = tuple(classes)
    unknown = [c for c in classes if c not in SHAPE_CLASSES]
    if unknown or not 2 <= len(classes) <= 4 or len(set(classes)) != len(classes):
        raise ConfigError(f"shapes_multi classes {list(classes)} invalid: give 2 to 4 distinct names from "
                          f"{', '.join(SHAPE_CLASSES)}")
    if n_images < 1 or size < 16 or not 0.0 < presence <= 1.0:
        raise ConfigError(f"shapes_multi needs n_images >= 1, size >= 16, 0 < presence <= 1 "
                          f"(got {n_images}, {size}, {presence})")

    def fill(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        (tmp / "images").mkdir()
        rows = ["path,labels\n"]
        half = size / 2.0
        for i in range(n_images):
            img, base = _background(rng, size)
            image = np.ascontiguousarray(img.astype(np.uint8))
            present = [c for c in classes if rng.random() < presence]
            quadrants = rng.permutation(4)[:len(present)]
            for kind, q in zip(present, quadrants):
                r = rng.uniform(0.12, 0.17) * size  # fits its quadrant (half the side) with the tilted corners
                margin = r * 1.25 + 1
                x0, y0 = (q % 2) * half, (q // 2) * half
                cx = x0 + rng.uniform(margin, max(margin, half - margin))
                cy = y0 + rng.uniform(margin, max(margin, half - margin))
                _draw_shape(image, kind, cx, cy, r, rng.uniform(-10.0, 10.0), _shape_colour(rng, base), cv2.LINE_AA)
            name = f"images/{i:04d}.png"
            Image.fromarray(image).save(tmp / name)
            rows.append(f"{name},{' '.join(present)}\n")
        (tmp / "labels.csv").write_text("".join(rows))

    params = {"n_images": n_images, "size": size, "classes": list(classes), "presence": presence, "seed": seed}
    return _write_atomically(Path(root), "shapes_multi", params, fill)


BUILTIN: dict[str, Callable[..., Path]] = {"digits": export_digits, "shapes": write_shapes,
                                           "shapes_multi": write_shapes_multi}


SHAPES_SEG_VERSION = 2
"""Bumped when the generator draws differently: a set written by another version is regenerated."""


def write_shapes_seg(
    root: str | Path,
    n_images: int = 1200,
    size: int = 64,
    classes: Sequence[str] = ("circle", "square", "triangle"),
    max_shapes: int = 3,
    seed: int = 0,
) -> Path:
    """Generate a shapes *segmentation* set: ``root/images/<i:04d>.png`` + ``root/masks/<i:04d>.png``.

    Each image holds 1..``max_shapes`` filled shapes on a textured background; its mask holds the class
    index of every pixel (0 = background, ``k`` = ``classes[k-1]``). Shapes are drawn without
    anti-aliasing, into image and mask with the same call, so the masks are exact; later shapes cover
    earlier ones in both. ``root/classes.yaml`` lists the class names. Written atomically, like
    :func:`write_shapes`.

    Args:
        root: Destination folder (created).
        n_images: Number of image/mask pairs.
        size: Image side in pixels.
        classes: Shape names (foreground classes), a subset of :data:`SHAPE_CLASSES`.
        max_shapes: Most shapes per image.
        seed: Random seed.

    Returns:
        ``root`` as a Path.

    Raises:
        ConfigError: Unknown shape name or non-positive sizes.
    """
    classes = tuple(classes)
    unknown = [c for c in classes if c not in SHAPE_CLASSES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"shapes_seg classes {list(classes)} invalid: give distinct names from "
                          f"{', '.join(SHAPE_CLASSES)}")
    if n_images < 1 or size < 16 or max_shapes < 1:
        raise ConfigError(f"shapes_seg needs n_images >= 1, size >= 16, max_shapes >= 1 "
                          f"(got {n_images}, {size}, {max_shapes})")

    def fill(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        names = ["background", *classes]
        (tmp / "classes.yaml").write_text("".join(f"- {n}\n" for n in names))
        for i in range(n_images):
            img, base = _background(rng, size)
            image = np.ascontiguousarray(img.astype(np.uint8))
            mask = np.zeros((size, size), dtype=np.uint8)
            for _ in range(int(rng.integers(1, max_shapes + 1))):
                label = int(rng.integers(len(classes)))
                r = rng.uniform(0.12, 0.22) * size
                margin = r * 1.25 + 1
                cx, cy = rng.uniform(margin, size - margin, size=2)
                angle = rng.uniform(-10.0, 10.0)
                colour = _shape_colour(rng, base)
                args = (classes[label], cx, cy, r, angle)
                _draw_shape(image, *args, colour, cv2.LINE_8)
                _draw_shape(mask, *args, label + 1, cv2.LINE_8)
            Image.fromarray(image).save(tmp / "images" / f"{i:04d}.png")
            Image.fromarray(mask).save(tmp / "masks" / f"{i:04d}.png")

    params = {"n_images": n_images, "size": size, "classes": list(classes), "max_shapes": max_shapes,
              "seed": seed, "version": SHAPES_SEG_VERSION}
    return _write_atomically(Path(root), "shapes_seg", params, fill)


SEG_BUILTIN: dict[str, Callable[..., Path]] = {"shapes_seg": write_shapes_seg}
"""Built-in segmentation sets (images/ + masks/), used by the segmentation data module."""


def ensure_builtin(name: str, root: str | Path) -> Path:
    """Create built-in data set ``name`` in ``root`` unless it is already complete there.

    Args:
        name: A key of :data:`BUILTIN` (``"digits"`` or ``"shapes"``).
        root: Destination folder.

    Returns:
        ``root`` as a Path.

    Raises:
        ConfigError: Unknown name.
    """
    if name not in BUILTIN:
        raise ConfigError(f"unknown data.builtin '{name}': choose from {', '.join(sorted(BUILTIN))}")
    root = Path(root).expanduser()
    if is_complete(root):
        return root
    return BUILTIN[name](root)
