"""Slot lock files for GPU leases (visionsweep.gpus): one file per GPU slot, locked with ``fcntl.lockf``.

POSIX record locks belong to a process: the kernel drops them when it ends (SIGKILL included), forked
children do not inherit them, and closing *any* fd of a file drops the process's lock on it, so a
process never opens a slot file it holds a second time (:func:`busy` is only asked of slots not held).
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Any

from visionsweep.errors import ConfigError


def default_lock_dir() -> Path:
    """The node-wide folder of lease files (every user's sweeps on this node share it): ``/tmp``'s, not
    ``$TMPDIR``'s, which schedulers often make per job."""
    root = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    return root / "visionsweep-gpu-leases"


def lock_dir(value: Any) -> Path:
    """The folder of the lease files (``gpus.lock_dir``, or :func:`default_lock_dir`), made if missing.

    Raises:
        ConfigError: it is not a folder this process may write.
    """
    path = Path(str(value)).expanduser() if value else default_lock_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not value:
            os.chmod(path, 0o1777)  # shared like /tmp: each user's leases in one place
    except PermissionError:
        pass  # a shared folder another user made: writable is what counts
    except OSError as e:  # a file of that name, a path through a file, ...
        raise ConfigError(f"gpus.lock_dir={path} is not a folder ({e.strerror}): set gpus.lock_dir to a folder "
                          "every job on this node may write") from None
    if not path.is_dir() or not os.access(path, os.W_OK):
        raise ConfigError(f"gpus.lock_dir={path} is not a writable folder: set gpus.lock_dir to a folder every "
                          "job on this node may write")
    return path


def slot_file(lock_dir: Path, gpu: str, slot: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in gpu)
    return lock_dir / f"gpu-{safe}.slot{slot}.lock"


def open_slot(path: Path) -> int:
    """The slot file opened read-write; created (and opened to every user) when it does not exist yet.

    Raises:
        ConfigError: it exists but may not be opened (another user's file where ``protected_regular``
            forbids opening it with ``O_CREAT``, or one made without the shared mode).
    """
    try:
        return os.open(path, os.O_RDWR)
    except FileNotFoundError:
        pass
    except PermissionError:
        raise ConfigError(f"GPU lease file {path} may not be opened by this user: set gpus.lock_dir to a folder "
                          "all of this node's jobs may write") from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:  # another job created it a moment ago
        return open_slot(path)
    try:
        os.fchmod(fd, 0o666)  # another user's job may lock it next (the umask took write away)
    except OSError:
        pass
    return fd


def try_slot(path: Path, owner: str) -> int | None:
    """Lock one slot file without waiting: its fd, or None when another process holds it."""
    fd = open_slot(path)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode(), 0)
    return fd


def busy(path: Path) -> bool:
    """Whether another process holds this slot (a probe lock, released at once)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
