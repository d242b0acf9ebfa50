"""Errors a user can cause and fix: bad paths, bad data, bad config values.

Entry points catch :class:`VisionSweepError`, print its message as one line and exit with code 2,
so a message must name the bad thing and say how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterator


class VisionSweepError(Exception):
    """Base class of every user-fixable error (printed as one line, exit code 2)."""


class ConfigError(VisionSweepError):
    """A configuration value or override is wrong (unknown model, bad augmentation argument, ...)."""


class DataError(VisionSweepError):
    """The data set on disk is wrong (missing folder, no images, unreadable file, ...)."""


class DiskFullError(VisionSweepError):
    """A write ran out of space: the message names the file (nothing half-written is left under it).

    Args:
        path: The file (or folder) being written; a complete message of this class is kept as it is
            (entry points rebuild errors as ``type(e)(str(e))``).
    """

    PREFIX = "no space left on device writing "

    def __init__(self, path: object) -> None:
        text = str(path)
        if text.startswith(self.PREFIX):
            super().__init__(text)
            self.path = text[len(self.PREFIX):].split(": free some space")[0]
            return
        self.path = text
        super().__init__(f"{self.PREFIX}{text}: free some space or write the run elsewhere (hydra.run.dir=...)")

    def __reduce__(self) -> tuple:  # one-argument pickling (DataLoader workers, multiprocessing)
        return (type(self), (self.path,))


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc``, then its causes / contexts, each once.

    The chain can loop: ``raise inner from None`` inside ``except outer`` (Hydra's instantiate wrapper
    re-raised as our own error) leaves ``outer.__cause__ is inner`` and ``inner.__context__ is outer``.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
