"""Errors a user can cause and fix: bad paths, bad data, bad config values.

Entry points catch :class:`VisionSweepError`, print its message as one line and exit with code 2,
so a message must name the bad thing and say how to fix it.
"""

from __future__ import annotations


class VisionSweepError(Exception):
    """Base class of every user-fixable error (printed as one line, exit code 2)."""


class ConfigError(VisionSweepError):
    """A configuration value or override is wrong (unknown model, bad augmentation argument, ...)."""


class DataError(VisionSweepError):
    """The data set on disk is wrong (missing folder, no images, unreadable file, ...)."""
