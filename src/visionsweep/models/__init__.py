"""LightningModules around timm backbones."""

from visionsweep.models.classifier import ClassifierModule

__all__ = ["ClassifierModule"]
