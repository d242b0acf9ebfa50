"""What a command may write: never over its own input, never over a file it did not write, unless asked.

Every command that takes an output location from the user (``export output=``, ``see out_dir=``,
``hydra.run.dir=``) checks it here before it writes anything; ``overwrite=true`` is the one way to say
"replace it". A folder a failed command created is removed again (:func:`made_dir`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from visionsweep.errors import ConfigError

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
