"""The ``default=`` of ``json.dumps`` for the values our JSON files meet (numpy numbers and arrays, paths)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def json_default(obj: Any) -> Any:
    """numpy scalars → Python numbers, arrays → lists, paths → strings, anything else → ``str(obj)``."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)
