"""The seed's convolution exercises on any image: blur, edge and Laplacian kernels with padding modes.

``see=kernels [image=<file|folder>] [see.padding=reflect] [see.extra='{sharpen: [[0,-1,0],[-1,5,-1],[0,-1,0]]}']``
writes one grid per image (rows: kernels; columns: original | result) and a padding comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from scipy import ndimage

from visionsweep.analysis import plots
from visionsweep.errors import ConfigError

# scipy.ndimage modes for the seed's padding choices: zero fill, mirror at the edge, repeat the edge
PADDING = {"zero": "constant", "reflect": "reflect", "nearest": "nearest", "mirror": "mirror", "wrap": "wrap"}

KERNELS: dict[str, np.ndarray] = {
    "box3": np.ones((3, 3)) / 9.0,           # 2.1: average of the 3x3 neighbourhood
    "box11": np.ones((11, 11)) / 121.0,      # 2.2: a bigger neighbourhood blurs more
    "horizontal_edge": np.array([[-1, -1, -1], [0, 0, 0], [1, 1, 1]], dtype=float),   # 2.3
    "vertical_edge": np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], dtype=float),     # 2.4
    "laplacian": np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]], dtype=float),    # 2.5: all edges
}


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (or gray) image → float gray in [0, 1] (ITU-R 709 luma, as skimage's rgb2gray)."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[..., :3] @ np.array([0.2125, 0.7154, 0.0721])
    return arr / 255.0 if np.asarray(image).dtype == np.uint8 else arr


def convolve(image: np.ndarray, kernel: np.ndarray, padding: str = "reflect") -> np.ndarray:
    """Convolve a gray image with ``kernel`` (``scipy.ndimage.convolve``) using a padding mode.

    Args:
        image: 2-D float image.
        kernel: 2-D kernel.
        padding: ``zero`` | ``reflect`` | ``nearest`` | ``mirror`` | ``wrap``.

    Returns:
        The filtered image, same shape as ``image``.
    """
    if padding not in PADDING:
        raise ConfigError(f"see.padding={padding}: choose from {', '.join(PADDING)}")
    return ndimage.convolve(np.asarray(image, dtype=np.float64), np.asarray(kernel, dtype=np.float64),
                            mode=PADDING[padding], cval=0.0)


def parse_kernels(names: list[str] | None, extra: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """The kernels to apply: chosen built-ins (None: all) plus ``extra`` name → 2-D list from YAML.

    Raises:
        ConfigError: an unknown built-in name or a kernel that is not a rectangular 2-D numeric list.
    """
    chosen = list(KERNELS) if names is None else list(names)
    unknown = [n for n in chosen if n not in KERNELS]
    if unknown:
        raise ConfigError(f"see.kernels: unknown kernel(s) {', '.join(map(str, unknown))}: built-ins are "
                          f"{', '.join(KERNELS)}; add your own under see.extra (name: [[...], ...])")
    out = {n: KERNELS[n] for n in chosen}
    for name, value in (extra or {}).items():
        try:
            arr = np.array(value, dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.zeros(0)
        if arr.ndim != 2 or arr.size == 0:
            raise ConfigError(f"see.extra.{name}: give a 2-D list of numbers, e.g. [[0,-1,0],[-1,5,-1],[0,-1,0]]")
        out[str(name)] = arr
    if not out:
        raise ConfigError("see.kernels is empty and see.extra gives none: nothing to apply")
    return out


def default_image() -> tuple[np.ndarray, str]:
    """A photo that ships with scikit-learn (works offline): the first of ``load_sample_images()``."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return np.asarray(data.images[0]), Path(data.filenames[0]).name


def shrink(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """Downscale so the long side is at most ``max_side`` (the seed: kernels look bigger on small images)."""
    import cv2

    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def display(result: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, dict[str, Any], str]:
    """How to show a filtered gray image so it looks like what the kernel does.

    Min-max rescaling every output (matplotlib's default) turns a sharpened photo into flat grey: its few
    overshooting pixels stretch the range. So:

    - a kernel whose weights sum to ~0 (edges, Laplacian) answers 0 on flat areas and has a sign: a
      diverging map with 0 in the middle (white), limits at the 99.5th percentile of ``|result|``;
    - any other kernel (blur, sharpen) keeps brightness once divided by its sum (so the seed's all-ones
      blur works too): that, clipped to the image range 0..1, in gray.

    Args:
        result: the filtered image (input gray in 0..1).
        kernel: the kernel that made it.

    Returns:
        The image to draw, ``imshow`` keyword arguments, and a short note for the title.
    """
    total = float(np.sum(kernel))
    if abs(total) <= 1e-6 * max(1.0, float(np.abs(kernel).sum())):
        lim = float(np.percentile(np.abs(result), 99.5)) or float(np.abs(result).max()) or 1.0
        return result, {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim}, "0 = white"
    return np.clip(result / total, 0.0, 1.0), {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}, "clipped to 0..1"


def kernel_grid(gray: np.ndarray, kernels: dict[str, np.ndarray], padding: str, index: plots.Index,
                name: str, label: str) -> Path:
    """One figure: a row per kernel, original | result (shown as :func:`display` says, with a colour bar)."""
    aspect = min(2.0, max(0.5, gray.shape[0] / gray.shape[1]))
    fig, axes = plots.grid(len(kernels), 2, panel=3.2, aspect=aspect)
    for row, (kname, kernel) in enumerate(kernels.items()):
        plots.show(axes[row, 0], gray, "original" if row == 0 else "", cmap="gray", vmin=0, vmax=1)
        shown, style, how = display(convolve(gray, kernel, padding), kernel)
        image = plots.show(axes[row, 1], shown, f"{kname} {kernel.shape[0]}x{kernel.shape[1]} ({padding}; {how})",
                           **style)
        plots.colorbar(axes[row, 1], image)
    return index.save(fig, name, f"kernels on {label} ({padding} padding)",
                      kernels=list(kernels), padding=padding, image=label)


def padding_grid(gray: np.ndarray, kernel: np.ndarray, index: plots.Index, name: str, label: str) -> Path:
    """One row per padding mode: the corner of the blurred image, where only the padding differs."""
    modes = ["zero", "reflect", "nearest"]
    crop = max(4 * kernel.shape[0], 16)
    fig, axes = plots.grid(1, len(modes) + 1)
    plots.show(axes[0, 0], gray[:crop, :crop], "original (corner)", cmap="gray", vmin=0, vmax=1)
    for col, mode in enumerate(modes, start=1):
        out = convolve(gray, kernel, mode)[:crop, :crop]
        plots.show(axes[0, col], out, f"{mode} padding", cmap="gray", vmin=0, vmax=1)
    return index.save(fig, name, f"padding modes: top-left corner of a {kernel.shape[0]}x{kernel.shape[1]} "
                      f"blur of {label}", padding=modes, image=label)


def run(cfg: DictConfig, index: plots.Index) -> None:
    """``see=kernels``: a kernel grid per image (and a padding comparison)."""
    from visionsweep.analysis.common import image_paths, load_images

    opts = cfg.see
    names = OmegaConf.to_container(opts.kernels) if opts.get("kernels") is not None else None
    extra = OmegaConf.to_container(opts.extra) if opts.get("extra") else None
    kernels = parse_kernels(names, extra)
    padding = str(opts.get("padding", "reflect"))
    if padding not in PADDING:
        raise ConfigError(f"see.padding={padding}: choose from {', '.join(PADDING)}")
    if cfg.get("image"):
        paths = image_paths(cfg.image, opts.get("max_images"))
        items = [(img, p.name) for img, p in zip(load_images(paths), paths)]
    else:
        items = [default_image()]
        index.note(f"no image= given: used scikit-learn's sample photo {items[0][1]}")
    for i, (img, label) in enumerate(items):
        gray = to_gray(shrink(img, opts.get("max_side")))
        stem = f"kernels_{i:03d}_{Path(label).stem}" if len(items) > 1 else f"kernels_{Path(label).stem}"
        kernel_grid(gray, kernels, padding, index, stem, label)
        if opts.get("compare_padding", True):
            padding_grid(gray, KERNELS["box11"], index, stem.replace("kernels_", "padding_", 1), label)
    index.data["kernels"] = {k: v.tolist() for k, v in kernels.items()}
