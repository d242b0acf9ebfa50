"""Folder image data: decoding, built-in offline data sets and the Lightning data module.

The names below are imported on first use (PEP 562): ``visionsweep.data.images`` alone must not pull
in torch and Lightning, so that an entry point checks its command line before the heavy imports.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "BUILTIN": "builtin", "ensure_builtin": "builtin", "export_digits": "builtin", "write_shapes": "builtin",
    "ImageFolderDataset": "dataset", "FolderDataModule": "folder", "SegmentationDataModule": "segmentation",
    "IMAGE_EXTENSIONS": "images", "check_image": "images", "is_image_file": "images", "load_rgb": "images",
    "split_counts": "splits", "stratified_split": "splits",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
