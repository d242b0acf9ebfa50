"""The one checker of config values: each bad value becomes one ConfigError line naming the key.

Every message has the same shape, ``<key>=<value>: give <what works>, e.g. <example>``, so a user reads
what was wrong and a value to type instead. Used by the builders of each config group (data, model,
optimizer, scheduler, trainer, callbacks, tune) and by the entry points' own keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from visionsweep.errors import ConfigError

__all__ = ["MAX_IMAGE_SIDE", "check_image_size", "choice", "fail", "flag", "fraction", "keys", "number", "whole"]


def fail(key: str, value: Any, wanted: str, example: Any = None) -> ConfigError:
    """The ConfigError of a bad value (raise it): ``key=value: give <wanted>[, e.g. <example>]``.

    Args:
        key: The dotted config key (``trainer.max_epochs``).
        value: The value given.
        wanted: What works, after "give" (``a whole number >= 1``).
        example: A value that works, shown as ``e.g. <example>`` (None: none shown).
    """
    shown = " ".join(str(value).split()) or repr(value)
    tail = f", e.g. {example}" if example is not None else ""
    return ConfigError(f"{key}={shown}: give {wanted}{tail}")


def _bounds(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"from {low}{' (excluded)' if low_open else ''} to {high}{' (excluded)' if high_open else ''}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def whole(value: Any, key: str, minimum: int | None = None, maximum: int | None = None, example: Any = None,
          *, also: str = "") -> int:
    """``value`` as a whole number within ``[minimum, maximum]``.

    Accepts ints, integral floats (``1e3``) and strings of them (``"12"``); not bools, not ``0.5``.

    Args:
        value: The value given.
        key: The dotted config key, named in the error.
        minimum: Smallest allowed value (None: no bound).
        maximum: Largest allowed value (None: no bound).
        example: A value that works (default: ``minimum``, else 1).
        also: Other accepted values, appended to the message (``" or -1 (all)"``).

    Raises:
        ConfigError: Not a whole number, or out of bounds.
    """
    example = example if example is not None else (minimum if minimum is not None else 1)
    wanted = f"a whole number {_bounds(minimum, maximum)}".rstrip() + also
    out = _as_whole(value)
    if out is None or (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        raise fail(key, value, wanted, example)
    return out


def _as_whole(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    try:
        f = float(str(value).strip())
    except ValueError:
        return None
    if not math.isfinite(f) or f != int(f):
        return None
    try:
        return int(str(value).strip())  # exact for big integers written as digits
    except ValueError:
        return int(f)


def number(value: Any, key: str, minimum: float | None = None, maximum: float | None = None,
           example: Any = None, *, low_open: bool = False, high_open: bool = False, also: str = "") -> float:
    """``value`` as a finite number within its bounds (``low_open``/``high_open``: bound excluded).

    Raises:
        ConfigError: Not a finite number, or out of bounds.
    """
    wanted = f"a number {_bounds(minimum, maximum, low_open, high_open)}".rstrip() + also
    try:
        out = float(str(value).strip()) if not isinstance(value, bool) and value is not None else math.nan
    except ValueError:
        out = math.nan
    bad = not math.isfinite(out)
    if not bad and minimum is not None:
        bad = out <= minimum if low_open else out < minimum
    if not bad and maximum is not None:
        bad = out >= maximum if high_open else out > maximum
    if bad:
        raise fail(key, value, wanted, example)
    return out


def fraction(value: Any, key: str, example: Any = 0.5, *, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a number from 0 to 1 (``low_open``/``high_open``: 0 / 1 excluded).

    Raises:
        ConfigError: Not a number in that range.
    """
    return number(value, key, 0, 1, example, low_open=low_open, high_open=high_open)


def flag(value: Any, key: str) -> bool:
    """``value`` as a bool: true/false (also yes/no, 1/0 as Hydra may pass them as strings).

    Raises:
        ConfigError: Anything else (``abc`` is not silently true).
    """
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("true", "yes", "1"):
        return True
    if word in ("false", "no", "0"):
        return False
    raise fail(key, value, "true or false", "true")


def choice(value: Any, key: str, options: Iterable[Any]) -> Any:
    """``value`` if it is one of ``options`` (strings compared case-insensitively), else a ConfigError."""
    options = list(options)
    for option in options:
        if value == option or (isinstance(value, str) and isinstance(option, str)
                               and value.strip().lower() == option.lower()):
            return option
    shown = list(dict.fromkeys(str(o) for o in options))  # 16 and "16" read the same
    raise fail(key, value, "one of " + ", ".join(shown), options[0])


#: the largest image side accepted: one 8192 px RGB image is 192 MiB (768 MiB as float32)
MAX_IMAGE_SIDE = 8192
#: the largest float32 input batch accepted (data.batch_size x 3 x image_size²)
MAX_BATCH_BYTES = 64 * 2**30


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n_bytes < 1024 or unit == "PiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""  # unreachable


def check_image_size(side: int, batch_size: int | None = None, key: str = "data.image_size") -> int:
    """Refuse an input side whose images (or batches) would not fit in memory, saying what they would take.

    Args:
        side: The square input side in pixels (already a whole number >= 1).
        batch_size: The batch it is loaded in (None: only the side is checked).
        key: The config key named in the error.

    Raises:
        ConfigError: ``side`` > :data:`MAX_IMAGE_SIDE`, or a float32 batch over :data:`MAX_BATCH_BYTES`.
    """
    image = 3 * side * side
    batch = f", a batch of {batch_size} {_size(4 * image * batch_size)} as float32" if batch_size else ""
    if side > MAX_IMAGE_SIDE:
        raise fail(key, side, f"a side of at most {MAX_IMAGE_SIDE} px (one {side} px image is {_size(image)} as "
                   f"uint8{batch})", 224)
    if batch_size and 4 * image * batch_size > MAX_BATCH_BYTES:
        raise fail(key, side, f"a smaller side or data.batch_size (a batch of {batch_size} {side} px images is "
                   f"{_size(4 * image * batch_size)} as float32, over {_size(MAX_BATCH_BYTES)})", 224)
    return side


def keys(node: Any, rules: dict[str, Any], prefix: str = "") -> None:
    """Apply ``rules`` (dotted key under ``node`` → ``check(value, full_key)``) to the keys ``node`` sets.

    Null (and absent) values are left to their defaults. Used for a group's or an entry point's own keys.

    Args:
        node: A DictConfig or dict.
        rules: Dotted key → a check taking (value, full key), e.g. ``lambda v, k: whole(v, k, 1)``.
        prefix: Prepended to each key in messages (``"see."``).

    Raises:
        ConfigError: The first bad value.
    """
    from omegaconf import DictConfig, OmegaConf

    for key, check in rules.items():
        if isinstance(node, DictConfig):
            value = OmegaConf.select(node, key, default=None)
        else:
            value = node
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            check(value, prefix + key)
