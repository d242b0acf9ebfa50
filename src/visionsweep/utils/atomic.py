"""Writes that are complete or absent: a temporary ``<name>.tmp`` beside the target, renamed when done.

A kill, a crash or a full disk then never leaves a truncated file under a valid name: readers see the
old content or the new one. A full disk (``ENOSPC``/``EDQUOT``) becomes :class:`DiskFullError` naming the
target, after our partial temporary file is removed (which also gives the space back, so the run can
still record that it failed). Used for run.json, config.yaml and perf.json; :mod:`visionsweep.utils.safe_io`
applies it to every checkpoint and to metrics.csv. :func:`json_default` is the one converter of values JSON does
not take (numpy, torch, paths) in the files we write.

What a command may write: never over its own input, never over a file it did not write, unless asked.
Every command that takes an output location from the user (``export output=``, ``see out_dir=``,
``hydra.run.dir=``) checks it with :func:`check_output_file` / :func:`check_out_dir` /
:func:`check_run_dir` before it writes anything; ``overwrite=true`` is the one way to say "replace it".
A folder a failed command created is removed again (:func:`made_dir`).

:func:`intact_rows` is the one reader of a metrics.csv that may be damaged (cut by a kill, garbage, edited
by hand: the one file appended row by row): the report reads it for curves, a resumed run to keep the
epochs it had finished; both keep the intact rows and say, in one line naming the file, what was left out.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from visionsweep.errors import ConfigError, DiskFullError, exception_chain

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
    """numpy/torch scalars → Python numbers, arrays and tensors → lists, paths → strings, anything else →
    ``str(obj)``: the one converter of values JSON does not take, for every file that may hold them."""
    if hasattr(obj, "tolist") and not isinstance(obj, type):  # np.generic, np.ndarray, torch.Tensor (not classes)
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


RUN_FILES = ("run.json", "config.yaml", "metrics.csv", "checkpoints")  # what a finished run dir holds


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file (links and ``..`` included; False when either is missing)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_output_file(path: Path, *, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                      key: str = "output", ours: Callable[[Path], bool] | None = None) -> None:
    """Refuse to write ``path`` over an input of the command (always) or over a file it did not write.

    Args:
        path: The file the command is about to write.
        inputs: Files the command reads (a checkpoint...): never replaced, not even with ``overwrite=true``.
        overwrite: The user's ``overwrite=true``: an existing file that is not an input may be replaced.
        key: The config key that named ``path``, for the message.
        ours: Tells whether an existing ``path`` was written by this command before (then it may be
            replaced, as a re-run of the same command would).

    Raises:
        ConfigError: In one line naming ``key``, the file and what to do instead.
    """
    for source in inputs:
        if same_file(path, source):
            raise ConfigError(f"{key}={path} is the input file {source}: writing it would destroy it; "
                              "choose another output file")
    if path.is_dir():
        raise ConfigError(f"{key}={path} is a folder: give a file name")
    if path.exists() and not overwrite and not (ours and ours(path)):
        raise ConfigError(f"{key}={path} already exists and was not written by this command: choose another "
                          "file, or add overwrite=true to replace it")


def check_run_dir(path: Path, *, overwrite: bool = False, resumes: Path | None = None,
                  key: str = "hydra.run.dir") -> None:
    """Refuse a run dir that already holds a run (its run.json, config, metrics or checkpoints).

    Args:
        path: The run dir asked for.
        overwrite: ``overwrite=true``: the files of the old run may be replaced.
        resumes: The checkpoint a training run resumes from; resuming into its own run dir is allowed.
        key: The config key that named ``path``.

    Raises:
        ConfigError: In one line naming the dir and the ways out.
    """
    held = [name for name in RUN_FILES if (path / name).exists()]
    if not held or overwrite:
        return
    if resumes is not None and same_file(Path(resumes).parent.parent, path):
        return
    raise ConfigError(f"{key}={path} already holds a run ({', '.join(held)}): it would be overwritten; "
                      "leave hydra.run.dir out (every run gets a new dir), resume it with "
                      f"ckpt_path={path}/checkpoints/last.ckpt, or add overwrite=true to replace it")


def check_out_dir(path: Path, *, overwrite: bool = False, marker: str = "index.json",
                  key: str = "out_dir") -> None:
    """Refuse an output folder that holds files this command did not write.

    Args:
        path: The folder asked for.
        overwrite: ``overwrite=true``: write into it anyway (same-named files are replaced).
        marker: The file an earlier run of the command left there; such a folder is the command's own.
        key: The config key that named ``path``.

    Raises:
        ConfigError: ``path`` is a file, or a folder with other files in it.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={path} is a file: give a folder (it is created if missing)")
    if overwrite or not path.is_dir() or (path / marker).is_file() or not any(path.iterdir()):
        return
    raise ConfigError(f"{key}={path} already holds files this command did not write: give an empty or new "
                      "folder, or add overwrite=true to write into it")


@contextlib.contextmanager
def made_dir(path: Path) -> Iterator[Path]:
    """Create ``path`` if needed; if the block fails, remove it again when this call created it.

    Only a folder this call made goes (with what the failed command wrote into it); a folder that was
    there before keeps everything.
    """
    existed = path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if not existed:
            shutil.rmtree(path, ignore_errors=True)
        raise


def intact_rows(raw: bytes, path: Path, whole: str) -> tuple[list[dict[str, str]], list[str], str | None]:
    """The intact rows of a metrics.csv, its header, and what is wrong with the rest (None when nothing is).

    Args:
        raw: The file's bytes.
        path: The file, named in the message.
        whole: What the caller does when nothing can be used ("left out the job's curves").

    Returns:
        (rows as dicts, header, problem): a file damaged throughout gives no rows.
    """
    text = raw.decode("utf-8", errors="replace")  # a stray byte spoils its own row only
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
    except csv.Error:
        header = []
    if not raw.strip():
        return [], header, f"{path} is empty: {whole}"
    if "epoch" not in header or len(set(header)) != len(header) or any(_stray(h) for h in header):
        return [], [], f"{path} has no metrics header (epoch, step, ...): {whole}"
    lines: list[tuple[int, list[str]]] = []
    bad: list[tuple[int, str]] = []
    try:
        for fields in reader:
            lines.append((reader.line_num, fields))
    except csv.Error as e:
        bad.append((reader.line_num, f"and the rest cannot be parsed ({e})"))
    # the writer ends every row with a newline: a last line without one was cut off by a kill
    cut = lines[-1][0] if lines and not text.endswith(("\n", "\r")) else None
    good = []
    for line, fields in lines:
        why = "is cut off" if line == cut else _row_problem(fields, header) if fields else None
        if why:
            bad.append((line, why))
        elif fields:
            good.append(dict(zip(header, fields)))
    if not bad:
        return good, header, None
    bad.sort()
    shown = "; ".join(f"line {n} {why}" for n, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    if sum(n != cut for n, _ in bad) > len(good):  # mostly garbage: the few rows that parse mean nothing
        return [], header, f"{path} is damaged throughout ({shown}): {whole}"
    if len(bad) == 1:
        return good, header, f"{path} line {bad[0][0]} {bad[0][1]}: ignored that row"
    return good, header, f"{path} has {len(bad)} damaged rows ({shown}): ignored them"


def _stray(text: str) -> bool:
    return "\ufffd" in text or "\x00" in text


def _row_problem(fields: list[str], header: list[str]) -> str | None:
    """Why a metrics.csv row cannot be used (None when it can)."""
    if len(fields) != len(header):
        return f"has {len(fields)} of {len(header)} columns"
    for key, value in zip(header, fields):
        if value == "":
            continue
        if _stray(value):
            return f"has bytes that are not text in {key}"
        try:
            number = float(value)
        except ValueError:
            return f"has {_short(value)} in {key}, not a number"
        if key in ("epoch", "step") and not (number.is_integer() and number >= 0):
            return f"has {key} {_short(value)}, not a whole number"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
