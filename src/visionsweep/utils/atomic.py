"""Writes that are complete or absent: a temporary ``<name>.tmp`` beside the target, renamed when done.

A kill, a crash or a full disk then never leaves a truncated file under a valid name: readers see the
old content or the new one. A full disk (``ENOSPC``/``EDQUOT``) becomes :class:`DiskFullError` naming the
target, after our partial temporary file is removed (which also gives the space back, so the run can
still record that it failed). Used for run.json, config.yaml and perf.json; :mod:`visionsweep.utils.safe_io`
applies it to every checkpoint and to metrics.csv. :func:`json_default` is the one ``default=`` of our JSON writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from visionsweep.errors import DiskFullError, exception_chain

TMP_SUFFIX = ".tmp"
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def disk_full_cause(exc: BaseException | None) -> OSError | None:
    """The "no space left" OSError inside ``exc`` (itself, or its causes / contexts), or None.

    torch.save reports a failed write as a RuntimeError whose context is the OSError, hence the walk.
    """
    return next((e for e in exception_chain(exc) if isinstance(e, OSError) and e.errno in _FULL), None)


def tmp_path(path: str | Path, unique: bool = False) -> Path:
    """Where ``path`` is written before it is renamed into place: ``<path>.tmp``, or with ``unique`` (a file
    that several processes or threads may write at once, e.g. a shared cache entry)
    ``.<name>.<pid>.<random>.tmp``."""
    path = Path(path)
    if unique:
        return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    return path.with_name(path.name + TMP_SUFFIX)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", fsync: bool = True, unique: bool = False,
                **kwargs: Any) -> Iterator[IO]:
    """Open ``<path>.tmp`` for writing; on success flush, fsync and rename it to ``path``.

    Args:
        path: The final file.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        fsync: Push the data to the device before the rename (so a power cut cannot leave the new
            name on empty blocks); off for small files rewritten often.
        unique: A temporary name of this call's own (see :func:`tmp_path`), for concurrent writers.
        **kwargs: ``open`` arguments (``newline``, ``encoding``...).

    Raises:
        DiskFullError: The device is full; nothing was left behind, ``path`` kept its old content.
    """
    path = Path(path)
    tmp = tmp_path(path, unique)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if disk_full_cause(e) is not None and not isinstance(e, DiskFullError):
            raise DiskFullError(path) from e
        raise


def atomic_write(path: str | Path, data: str | bytes, fsync: bool = False) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically (see :func:`atomic_open`)."""
    binary = isinstance(data, (bytes, bytearray, memoryview))
    with atomic_open(path, "wb" if binary else "w", fsync=fsync,
                     **({} if binary else {"encoding": "utf-8"})) as f:
        f.write(data)


def save_figure(fig: Any, path: str | Path, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure (or anything with ``savefig``) to ``path`` atomically; the format is the suffix's."""
    path = Path(path)
    with atomic_open(path, "wb", fsync=False) as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    return path


def remove_tmp_files(folder: str | Path) -> list[Path]:
    """Remove the ``*.tmp`` files we may have left under ``folder`` (after a failure); returns them."""
    removed = []
    for p in Path(folder).rglob(f"*{TMP_SUFFIX}"):
        if p.is_file():
            _remove(p)
            removed.append(p)
    return removed


def json_default(obj: Any) -> Any:
    """numpy scalars → Python numbers, arrays → lists, paths → strings, anything else → ``str(obj)``."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)
