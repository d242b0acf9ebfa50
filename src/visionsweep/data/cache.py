"""Decoded-sample cache (``data.cache=memory|disk|none``): decode each image once, keep it small.

Every image is decoded once and resized so that its short side is ``short_side`` (aspect kept, never
enlarged), then stored as a uint8 ``H x W x 3`` array; albumentations later runs on these small arrays
instead of full-size decodes. The resize is albumentations' own ``SmallestMaxSize`` with the data's
interpolation, so a cached sample is bit-identical to "decode fresh + the same resize".

Two rules are used by :class:`~visionsweep.data.folder.FolderDataModule` (see :func:`train_short_side`):
the training split is stored a little larger than the crop (``image_size x 1.15``, room for random
crops), val/test exactly at the eval pipeline's own short side (``image_size / crop_pct``), which
makes evaluation on cached samples bit-identical to evaluation without a cache.

* ``memory``: all samples are decoded up front (a thread pool; the decoders release the GIL) into one
  packed uint8 buffer, shared copy-on-write with forked DataLoader workers.
* ``disk``: one small raw file per sample (16-byte header + the uint8 pixels; np.load's header parsing
  costs more than reading a small image) under ``<cache_dir>/<rule key>/``. The
  entry name hashes the file's path, size and mtime: a changed file simply misses (and is re-decoded),
  never serves stale pixels. Entries are written to a unique temp file and renamed into place (atomic on
  POSIX), so concurrent sweep jobs filling the same cache cannot corrupt it; no lock is needed because
  every writer of one entry writes the same bytes.

``python -m visionsweep.cache [train overrides]`` (``make cache``) pre-fills the disk cache with a progress bar.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from visionsweep.data.images import load_rgb
from visionsweep.errors import ConfigError, DiskFullError
from visionsweep.parallel import node_cores
from visionsweep.utils.atomic import atomic_open

log = logging.getLogger(__name__)

CACHE_MODES = ("none", "memory", "disk")
CACHE_DIRNAME = ".visionsweep_cache"  # hidden: the folder scanner skips it
_FORMAT = 1  # bump when the stored layout changes: old entries then simply miss
_MAGIC = b"VSC1"
_HEADER = struct.Struct("<4sIII")  # magic, height, width, channels


def encode_entry(arr: np.ndarray) -> bytes:
    """A uint8 HWC array as one cache entry (header + raw pixels)."""
    h, w, c = arr.shape
    return _HEADER.pack(_MAGIC, h, w, c) + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def decode_entry(data: bytes | bytearray) -> np.ndarray | None:
    """The array stored in ``data``; None when it is not a complete entry (truncated, foreign, corrupt).

    A ``bytearray`` is used in place (writable, no copy); ``bytes`` are copied.
    """
    if len(data) < _HEADER.size:
        return None
    magic, h, w, c = _HEADER.unpack_from(data)
    if magic != _MAGIC or len(data) != _HEADER.size + h * w * c:
        return None
    arr = np.frombuffer(data, dtype=np.uint8, offset=_HEADER.size).reshape(h, w, c)
    return arr if isinstance(data, bytearray) else arr.copy()


def train_short_side(image_size: int, crop_pct: float = 1.0, scale: float = 1.15) -> int:
    """Short side the training split is cached at: ``image_size x scale``, at least the eval short side."""
    return max(round(image_size * scale), eval_short_side(image_size, crop_pct))


def eval_short_side(image_size: int, crop_pct: float = 1.0) -> int:
    """Short side the eval pipeline resizes to (same formula as ``augment._eval_transforms``)."""
    return max(int(image_size), round(image_size / float(crop_pct)))


@dataclass(frozen=True)
class ResizeRule:
    """How a sample is stored: short side, interpolation and whether JPEGs decode at reduced scale.

    Args:
        short_side: Target short side in pixels (smaller images are kept as they are).
        interpolation: albumentations/cv2 interpolation name (``bilinear``, ``bicubic`` ...).
        reduce_decode: Decode large JPEGs at 1/2, 1/4, 1/8 scale first (see :func:`load_rgb`).
    """

    short_side: int
    interpolation: str = "bilinear"
    reduce_decode: bool = False

    def key(self) -> str:
        """Short stable hash of the rule (the name of its disk folder)."""
        text = json.dumps({"format": _FORMAT, **asdict(self)}, sort_keys=True)
        return f"s{self.short_side}-" + hashlib.sha1(text.encode()).hexdigest()[:10]

    def decode(self, path: str | Path) -> np.ndarray:
        """Decode ``path`` and resize it by this rule (what a cache stores).

        Args:
            path: Image file.

        Returns:
            uint8 ``H x W x 3`` array whose short side is ``min(short_side, original short side)``.
        """
        image = load_rgb(path, self.short_side if self.reduce_decode else None)
        return resize_short_side(image, self.short_side, self.interpolation)


def resize_short_side(image: np.ndarray, short_side: int, interpolation: str | int = "bilinear") -> np.ndarray:
    """Shrink ``image`` so its short side is ``short_side`` (aspect kept); smaller images are returned as is.

    Uses albumentations' ``SmallestMaxSize`` so the result matches what the eval pipeline computes.
    """
    if min(image.shape[:2]) <= short_side:
        return image
    import albumentations as A

    from visionsweep.augment import INTERPOLATIONS

    interp = INTERPOLATIONS[interpolation.lower()] if isinstance(interpolation, str) else int(interpolation)
    out = A.SmallestMaxSize(max_size=short_side, interpolation=interp, p=1.0)(image=image)["image"]
    return np.ascontiguousarray(out)


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar (Lightning ships tqdm) or a no-op stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="img", file=sys.stderr)
        except ImportError:  # pragma: no cover
            pass

    class _Null:
        def update(self, n: int = 1) -> None: ...
        def close(self) -> None: ...

    return _Null()


def _parallel(fn: Callable[[Path], object], paths: Sequence[Path], threads: int | None, desc: str,
              progress: bool) -> list:
    threads = max(1, threads or node_cores())
    bar = _progress(len(paths), desc, progress)
    out = []
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for item in pool.map(fn, paths):
                out.append(item)
                bar.update(1)
    finally:
        bar.close()
    return out


class MemoryCache:
    """All samples of a list of files decoded once into one packed uint8 buffer (see module docs).

    Args:
        rule: Resize rule.
        paths: The files to hold.
        threads: Decoding threads (None: the cores this process may use).
        progress: Show a progress bar while filling.
    """

    def __init__(self, rule: ResizeRule, paths: Iterable[str | Path], threads: int | None = None,
                 progress: bool = False) -> None:
        self.rule = rule
        paths = [Path(p) for p in paths]
        arrays = _parallel(rule.decode, paths, threads, f"caching {len(paths)} images (memory)", progress)
        self.shapes = [a.shape for a in arrays]
        sizes = np.array([a.size for a in arrays], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        # one buffer (not a list of arrays): forked workers touch one refcount, not N, so pages stay shared
        self.buffer = np.empty(int(self.offsets[-1]), dtype=np.uint8)
        for i, a in enumerate(arrays):
            self.buffer[self.offsets[i]:self.offsets[i + 1]] = a.reshape(-1)
        self.buffer.flags.writeable = False  # views handed out cannot be made writable again
        self.index = {os.fspath(p): i for i, p in enumerate(paths)}

    @property
    def nbytes(self) -> int:
        """Size of the packed buffer in bytes."""
        return int(self.buffer.nbytes)

    def get(self, path: str | Path) -> np.ndarray:
        """The stored sample of ``path``, decoding it if it was not filled in.

        A read-only view of the shared buffer, not a copy (albumentations' transforms return new arrays;
        one that writes into its input raises, and the dataset then retries on a copy).
        """
        i = self.index.get(os.fspath(path))
        if i is None:
            return self.rule.decode(path)
        view = self.buffer[self.offsets[i]:self.offsets[i + 1]].reshape(self.shapes[i])
        view.flags.writeable = False
        return view


class DiskCache:
    """Per-sample raw files (``.u8``) under ``<cache_dir>/<rule key>/`` (see module docs).

    Args:
        cache_dir: Cache root (``<data root>/.visionsweep_cache`` unless ``data.cache_dir`` is set).
        rule: Resize rule; one sub-folder per rule.
    """

    def __init__(self, cache_dir: str | Path, rule: ResizeRule) -> None:
        self.rule = rule
        self.dir = Path(cache_dir).expanduser() / rule.key()
        self.hits = self.misses = 0
        self._write_failed = False

    def entry(self, path: str | Path) -> Path:
        """Cache file of ``path`` in its current version (path, size and mtime are in the name)."""
        st = os.stat(path)
        ident = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}"
        digest = hashlib.sha1(ident.encode()).hexdigest()
        return self.dir / digest[:2] / f"{digest}.u8"

    def get(self, path: str | Path) -> np.ndarray:
        """The cached sample of ``path``; decoded and stored first when missing or stale."""
        entry = self.entry(path)
        try:
            with open(entry, "rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)  # read straight into a writable buffer
                arr = decode_entry(data if f.readinto(data) == len(data) else b"")
            if arr is not None:
                self.hits += 1
                return arr
        except OSError:
            pass  # missing or unreadable: decode again and replace it
        self.misses += 1
        arr = self.rule.decode(path)
        self._store(entry, arr)
        return arr

    def _store(self, entry: Path, arr: np.ndarray) -> None:
        try:  # atomic: readers (other jobs too) see the old entry, no entry, or the whole new one
            with atomic_open(entry, "wb", fsync=False, unique=True) as f:
                f.write(encode_entry(arr))
        except (OSError, DiskFullError) as e:
            if not self._write_failed:  # a read-only or full disk must not stop training
                self._write_failed = True
                log.warning("cannot write the sample cache under %s (%s): decoding without it", self.dir, e)

    def fill(self, paths: Sequence[str | Path], threads: int | None = None, progress: bool = False,
             fingerprint: dict | None = None) -> int:
        """Make sure every file in ``paths`` has a current entry.

        Args:
            paths: Files to cache.
            threads: Decoding threads (None: the cores this process may use).
            progress: Show a progress bar.
            fingerprint: Data fingerprint recorded in ``info.json`` beside the entries.

        Returns:
            How many entries had to be decoded (0 when the cache was already complete).
        """
        before = self.misses
        _parallel(self.get, [Path(p) for p in paths], threads, f"caching {len(paths)} images ({self.dir.name})",
                  progress)
        info = {"rule": asdict(self.rule), "format": _FORMAT, "n_files": len(paths), "fingerprint": fingerprint}
        with contextlib.suppress(OSError, DiskFullError):
            with atomic_open(self.dir / "info.json", "w", fsync=False, unique=True) as f:
                f.write(json.dumps(info, indent=2))
        return self.misses - before

    def prune(self, paths: Sequence[str | Path]) -> int:
        """Delete entries not belonging to the current version of ``paths`` (old or removed files).

        Returns:
            Number of files removed.
        """
        keep = {self.entry(p) for p in paths}
        removed = 0
        for f in self.dir.glob("*/*.u8"):
            if f not in keep:
                f.unlink(missing_ok=True)
                removed += 1
        return removed


def check_mode(mode: str | None) -> str:
    """Validate ``data.cache``; None/False mean ``none``."""
    mode = "none" if mode in (None, False) else str(mode).lower()
    if mode not in CACHE_MODES:
        raise ConfigError(f"data.cache={mode}: choose none, memory or disk")
    return mode


if __name__ == "__main__":  # the old spelling of the command: the CLI is visionsweep.cache
    from visionsweep.cache import main

    main()
