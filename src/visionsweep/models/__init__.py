"""LightningModules around timm backbones.

``ClassifierModule`` is imported on first use (PEP 562), so that ``visionsweep.models.<light module>``
does not pull in Lightning and timm.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["ClassifierModule"]


def _import_timm_without_wandb() -> None:
    """Import timm with ``wandb`` hidden, unless either is imported already.

    timm imports wandb when it is installed (``timm.utils.summary``, for timm's own train script): 237 modules
    and ~0.5 s in every job, though no job of ours reaches that code. A ``None`` in ``sys.modules`` makes
    that ``import wandb`` fail (timm catches the ImportError); the entry is removed again, so a run with
    ``logger=wandb`` imports wandb as usual.
    """
    if "timm" in sys.modules or "wandb" in sys.modules:
        return
    sys.modules["wandb"] = None  # type: ignore[assignment]
    try:
        import timm  # noqa: F401
    finally:
        if sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]


_import_timm_without_wandb()  # the models are timm backbones (smp's encoders too): whoever imports one imports timm


def __getattr__(name: str) -> Any:
    if name == "ClassifierModule":
        from visionsweep.models.classifier import ClassifierModule

        return ClassifierModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
