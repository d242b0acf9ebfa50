"""Optimizer parameter groups and what a callback may know about them.

Norm weights and biases get no weight decay (as timm and fastai do) unless asked. With layer-wise
groups (asked for by a callback, see :func:`wants_layer_groups`) each of timm's coarse layer groups
(stem, stages..., then the classifier) becomes its own pair of groups, so that learning rates can differ
by depth (:func:`discriminative_lrs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn


@dataclass(frozen=True)
class GroupInfo:
    """One optimizer parameter group, in the order of ``optimizer.param_groups``.

    Attributes:
        name: ``decay`` / ``no_decay``; with layer-wise groups the layer's label (``bn1+conv1``,
            ``layer1``... ``head``), ``<label>/no_decay`` for its undecayed part.
        layer: layer-group index, 0 = stem ... ``n_layers - 1`` = head (0 without layer-wise groups).
        n_layers: number of layer groups (1 without layer-wise groups).
        lr: the configured learning rate of the group (None until the optimizer is built).
    """

    name: str
    layer: int = 0
    n_layers: int = 1
    lr: float | None = None

    @property
    def depth(self) -> float:
        """Distance from the head: 0 for the head ... 1 for the stem."""
        return (self.n_layers - 1 - self.layer) / (self.n_layers - 1) if self.n_layers > 1 else 0.0


def wants_layer_groups(callbacks: Sequence[Any]) -> bool:
    """Whether a callback declares ``needs_layer_groups = True`` (it sets per-depth learning rates)."""
    return any(getattr(cb, "needs_layer_groups", False) for cb in callbacks)


def discriminative_lrs(groups: Sequence[GroupInfo], lr_mult: float) -> list[float]:
    """fastai's ``slice(lr / lr_mult, lr)``: each group's lr divided geometrically by depth.

    Args:
        groups: The optimizer's groups (their ``lr`` set).
        lr_mult: Head lr / stem lr.

    Returns:
        One lr per group: ``lr`` for the head, ``lr / lr_mult`` for the stem, geometric in between.
    """
    return [float(g.lr) / lr_mult ** g.depth for g in groups]


def _group_label(names: list[str]) -> str:
    """A short name for a layer group: the common first part of its parameter names (``layer3``)."""
    first = {n.split(".")[0] for n in names}
    if len(first) == 1:
        parts = {".".join(n.split(".")[:2]) for n in names}
        return parts.pop() if len(parts) == 1 else first.pop()
    return "+".join(sorted(first))


def param_groups(net: nn.Module, weight_decay_norm_bias: bool = False,
                 layerwise: bool = False) -> tuple[list[dict[str, Any]], list[GroupInfo]]:
    """Parameter groups of ``net`` for a ``torch.optim`` optimizer, and their descriptions.

    Args:
        net: The network (a timm model when ``layerwise``).
        weight_decay_norm_bias: Also decay norm weights, biases and the model's ``no_weight_decay()``
            names; off: those get ``weight_decay=0``.
        layerwise: One pair of groups per layer group (stem → head) instead of one pair in all.

    Returns:
        ``(groups, infos)``: torch groups (``params``, ``name`` unless there is one group only, and
        ``weight_decay=0`` for undecayed ones; decaying groups leave ``weight_decay`` to the optimizer's
        config) and a :class:`GroupInfo` for each, in the same order. Empty groups are left out.
    """
    # imported here: visionsweep.models imports the classifier, which imports this package
    from visionsweep.models.backbones import layer_groups

    params = dict(net.named_parameters())
    names = layer_groups(net) if layerwise else [list(params)]
    skip = set(getattr(net, "no_weight_decay", lambda: set())())
    groups: list[dict[str, Any]] = []
    infos: list[GroupInfo] = []
    for i, group in enumerate(names):
        label = ("head" if i == len(names) - 1 else _group_label(group)) if layerwise else ""
        no_decay = {n for n in group if not weight_decay_norm_bias and (
            params[n].ndim <= 1 or n.endswith(".bias") or n in skip)}
        for kind, members in (("decay", [n for n in group if n not in no_decay]),
                              ("no_decay", [n for n in group if n in no_decay])):
            if not members:
                continue
            name = f"{label}/{kind}" if label and kind == "no_decay" else (label or kind)
            groups.append({"params": [params[n] for n in members], "name": name,
                           **({"weight_decay": 0.0} if kind == "no_decay" else {})})
            infos.append(GroupInfo(name, layer=i, n_layers=len(names)))
    if len(groups) == 1:  # nothing to tell apart: LearningRateMonitor then logs a plain lr-<Optimizer>
        del groups[0]["name"]
    return groups, infos
