"""LightningModules around timm backbones.

``ClassifierModule`` is imported on first use (PEP 562), so that ``visionsweep.models.<light module>``
does not pull in Lightning and timm.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ClassifierModule"]


def __getattr__(name: str) -> Any:
    if name == "ClassifierModule":
        from visionsweep.models.classifier import ClassifierModule

        return ClassifierModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
