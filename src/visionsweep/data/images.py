"""Reading image files into uint8 RGB arrays, and a cheap per-file health check.

Every image mode Pillow can open (palette, alpha, CMYK, 1-bit, 16-bit, float) ends up as an
``H x W x 3`` ``uint8`` array, so the augmentation pipeline and the model only ever see one format.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from visionsweep.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""File extensions treated as images (compared lower-cased, so ``.JPG`` counts)."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def is_image_file(path: str | Path) -> bool:
    """Tell whether a file name has an image extension (case-insensitive).

    Args:
        path: File path or name.

    Returns:
        True when the suffix is one of :data:`IMAGE_EXTENSIONS`.
    """
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _one_line(text: str) -> str:
    # Entry points print errors as one line; Pillow messages occasionally contain newlines.
    return " ".join(str(text).split())


SKIP_ADVICE = "remove it or set data.skip_bad_images=true"
"""The fix a bad-image error names by default: train (and ``see`` augment / batch) have that key."""
_advice = [SKIP_ADVICE]  # the innermost bad_image_advice(); DataLoader workers fork with it


@contextmanager
def bad_image_advice(fix: str) -> Iterator[None]:
    """Name ``fix`` instead of :data:`SKIP_ADVICE` in the bad-image errors raised inside the block.

    A command without ``data.skip_bad_images`` (predict, eval...) states the fix that exists for it,
    as the message is built deep in the data code, where the command is not known.

    Args:
        fix: What the user can do, e.g. ``"remove it or set skip_bad_images=true"``.
    """
    _advice.append(fix)
    try:
        yield
    finally:
        _advice.pop()


class BadImageError(DataError):
    """An unreadable image file; ``path`` and ``reason`` let a caller skip it or re-word the fix.

    Args:
        message: The one-line message (:func:`bad_image_message`).
        path: The file.
        reason: The short reason, e.g. ``"zero-byte file"``.
    """

    def __init__(self, message: str, path: str | Path | None = None, reason: str | None = None) -> None:
        super().__init__(message)  # one positional argument: DataLoader re-raises worker errors as type(msg)
        self.path, self.reason = path, reason


def bad_image_message(path: str | Path, reason: str, fix: str | None = None) -> str:
    """Build the one-line message used for an unreadable image.

    Args:
        path: The offending file.
        reason: Short reason, e.g. ``"zero-byte file"``.
        fix: What to do about it; None: the innermost :func:`bad_image_advice`, else :data:`SKIP_ADVICE`.

    Returns:
        A message naming the path, the reason and the fix.
    """
    return f"cannot read image '{path}' ({_one_line(reason)}): {fix or _advice[-1]}"


def _bad(path: str | Path, reason: str) -> BadImageError:
    return BadImageError(bad_image_message(path, reason), path, reason)


def _reason(exc: BaseException) -> str:
    """Map a Pillow / OS exception to a short human reason."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "a symlink loop: the link leads back to itself"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image: Pillow cannot identify the format"
    text = _one_line(str(exc)) or type(exc).__name__
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated file: {text}"
    return f"{type(exc).__name__}: {text}"


def _rescale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map an integer/float array with an arbitrary range linearly onto 0..255."""
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, 0.0)
    lo = min(float(arr.min()), 0.0)  # keep 0 black unless the data goes negative
    hi = float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _gray_to_uint8(img: Image.Image) -> np.ndarray | None:
    """Convert the single-channel high-depth modes to a uint8 H x W array (None for other modes)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.uint32)
        # 65535 / 257 == 255 exactly; +128 rounds to nearest instead of truncating.
        return ((arr + 128) // 257).astype(np.uint8)
    if mode == "I":
        arr = np.asarray(img)
        if arr.size and arr.min() >= 0 and arr.max() <= 255:
            return arr.astype(np.uint8)  # already 8-bit data stored in a 32-bit container
        return _rescale_to_uint8(arr)
    if mode == "F":
        arr = np.asarray(img)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            return np.round(np.nan_to_num(arr, nan=0.0) * 255.0).astype(np.uint8)
        return _rescale_to_uint8(arr)
    return None


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a (loaded) Pillow image of any mode to a uint8 ``H x W x 3`` RGB array.

    Transparent pixels are composited over white; 16-bit data is scaled (not clipped) to 8 bits.

    Args:
        img: A Pillow image.

    Returns:
        A C-contiguous ``uint8`` array of shape ``(H, W, 3)``.
    """
    gray = _gray_to_uint8(img)
    if gray is not None:
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode == "1":
        img = img.convert("L")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr)


def _jpeg_reduction(short_side: int, min_short_side: int | None) -> int:
    """Largest libjpeg DCT scale (1, 2, 4, 8) that keeps the short side >= ``min_short_side``."""
    if not min_short_side:
        return 1
    for factor in (8, 4, 2):
        if short_side // factor >= min_short_side:
            return factor
    return 1


# libjpeg's DCT scaling factor -> OpenCV flag; RGB output straight from the decoder (no BGR->RGB pass)
# where OpenCV has IMREAD_COLOR_RGB (4.11+), else BGR and one cvtColor.
_REDUCED = {1: "IMREAD_COLOR", 2: "IMREAD_REDUCED_COLOR_2", 4: "IMREAD_REDUCED_COLOR_4", 8: "IMREAD_REDUCED_COLOR_8"}
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range


def _jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """``(precision, height, width, components)`` from a complete JPEG's frame header, else None.

    None for anything that is not a JPEG, lacks the end-of-image marker (truncated) or has a malformed
    marker chain: such files go to Pillow, which reports them properly.
    """
    n = len(data)
    if n < 4 or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stand-alone markers
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF_MARKERS:
            if i + 10 > n:
                return None
            return data[i + 4], (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8], data[i + 9]
        if marker == 0xDA or length < 2:  # scan data before any frame header: malformed
            return None
        i += 2 + length
    return None


def _load_jpeg_cv2(path: str | Path, min_short_side: int | None) -> np.ndarray | None:
    """Decode a plain (8-bit RGB or gray, complete) JPEG with OpenCV, else None (then Pillow decodes it).

    The file is read once; its frame header is parsed here (a few microseconds, where opening it with
    Pillow just to learn the mode costs ~60), then ``cv2.imdecode`` decodes the same bytes, straight to
    RGB and, when allowed, at reduced DCT scale. OpenCV's decoder is faster than Pillow +
    ``exif_transpose``, gives bit-identical pixels for RGB/gray JPEGs (both use libjpeg-turbo's defaults;
    checked in tests) and honours the EXIF orientation itself. CMYK and 12-bit JPEGs stay on the Pillow
    path (OpenCV's results differ), as do files without the end-of-image marker (truncated: Pillow
    raises, OpenCV would return a partly grey image with only a warning).
    """
    try:
        import cv2
    except ImportError:  # pragma: no cover - albumentations depends on opencv
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None  # the Pillow path raises the proper one-line error
    header = _jpeg_header(data)
    if header is None:
        return None
    precision, height, width, components = header
    if precision != 8 or components not in (1, 3) or not height or not width:
        return None
    flag = getattr(cv2, _REDUCED[_jpeg_reduction(min(height, width), min_short_side)])
    rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)
    if rgb is not None:
        flag = (flag & ~cv2.IMREAD_COLOR) | rgb
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if image is None or image.ndim != 3:
        return None
    return image if rgb is not None else np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def load_rgb(path: str | Path, min_short_side: int | None = None) -> np.ndarray:
    """Decode an image file into a uint8 RGB array, honouring EXIF orientation.

    Plain RGB/gray JPEGs are decoded with OpenCV (same pixels as Pillow, faster); every other file
    with Pillow (palette, alpha, 16-bit, CMYK ... see :func:`to_rgb_array`).

    Args:
        path: Image file.
        min_short_side: When given, a JPEG at least twice this size (short side) is decoded at a
            reduced scale (1/2, 1/4 or 1/8, done inside the JPEG decoder, several times faster) such that
            its short side stays >= ``min_short_side``. None decodes at full size.

    Returns:
        ``uint8`` array of shape ``(H, W, 3)``.

    Raises:
        BadImageError: The file is empty, missing, not an image or truncated (one-line message naming it).
    """
    try:
        if os.path.getsize(path) == 0:
            raise _bad(path, "zero-byte file")
        fast = _load_jpeg_cv2(path, min_short_side)
        if fast is not None:
            return fast
        with Image.open(path) as img:
            if min_short_side and img.format == "JPEG":
                factor = _jpeg_reduction(min(img.size), min_short_side)
                if factor > 1:
                    img.draft(img.mode, (img.size[0] // factor, img.size[1] // factor))
            img.load()
            oriented = ImageOps.exif_transpose(img)  # returns a copy (or the image itself if no tag)
            return to_rgb_array(oriented if oriented is not None else img)
    except DataError:
        raise
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise _bad(path, _reason(exc)) from exc


def check_image(path: str | Path) -> str | None:
    """Cheaply check that a file is a readable image.

    Runs Pillow's ``verify()`` (PNG: every chunk CRC up to IEND) and then a cheap decode:
    JPEGs are decoded at 1/8 scale (``draft``), which still reads the whole entropy-coded data
    and so catches truncation; other formats are decoded fully.

    Args:
        path: Image file.

    Returns:
        None when the file is fine, else a short reason such as ``"zero-byte file"``.
    """
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte file"
        with Image.open(path) as img:
            img.verify()
        # verify() leaves the image unusable, so open it again for the decode check.
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (1, 1))
            img.load()
    except Exception as exc:
        return _reason(exc)
    return None
