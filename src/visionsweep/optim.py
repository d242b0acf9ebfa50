"""The optimizer side of training, shared by every LightningModule of ours.

- Parameter groups: norm weights and biases get no weight decay (as timm and fastai do) unless asked.
  With layer-wise groups (asked for by a callback, see :func:`wants_layer_groups`) each of timm's coarse
  layer groups (stem, stages..., then the classifier) becomes its own pair of groups, so that learning
  rates can differ by depth (:func:`discriminative_lrs`); :class:`GroupInfo` is what a callback reads.
- The optimizer and per-step scheduler from the ``optimizer`` / ``scheduler`` configs: both of our
  LightningModules hold an :class:`Optimization` and delegate ``configure_optimizers`` and
  ``lr_scheduler_step`` to it, so they build and step their schedules the same way.
- The ``tune`` values (:func:`check_tune`); the LR finder itself is :mod:`visionsweep.lr_find`,
  imported only when ``tune.lr_find=true``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import hydra.utils
import pytorch_lightning as pl
import torch
import torch.nn as nn
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_warn

from visionsweep.errors import ConfigError
from visionsweep.utils import checks


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


DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "lr": 1e-3}

# words of torch's "Invalid ..." messages → the config key they are about
_OPTIMIZER_KEYS = {"learning rate": "lr", "weight_decay": "weight_decay", "beta parameter": "betas",
                   "epsilon": "eps", "momentum": "momentum", "dampening": "dampening", "nesterov": "nesterov",
                   "alpha": "alpha", "lr_decay": "lr_decay", "rho": "rho"}


def _takes(target: Any, name: str) -> bool:
    """Whether the optimizer class ``target`` (a dotted path) has an argument ``name``."""
    import inspect

    try:
        return name in inspect.signature(hydra.utils.get_class(str(target))).parameters
    except Exception:  # noqa: BLE001 - an unknown target fails (with its own message) when it is built
        return True


def build_optimizer(opt_cfg: Mapping[str, Any], params: Any) -> torch.optim.Optimizer:
    """The ``optimizer`` config (``_target_`` + arguments) made for ``params``.

    Args:
        opt_cfg: The ``optimizer`` group as a mapping.
        params: Parameters or parameter groups.

    Raises:
        ConfigError: A value the optimizer rejects (``optimizer.lr=-1``), named as the config key.
    """
    cfg = {**opt_cfg, "_partial_": True}
    if cfg.get("fused") and not _takes(cfg.get("_target_"), "fused"):
        cfg.pop("fused")  # the defaults ask for fused kernels; optimizers without them (RMSprop, NAdam...) run
    try:
        return hydra.utils.instantiate(cfg)(params=params)
    except (ValueError, TypeError) as e:
        cause = e.__cause__ if isinstance(e.__cause__, (ValueError, TypeError)) else e
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        key = next((k for word, k in _OPTIMIZER_KEYS.items() if word in text.lower()), None)
        if key is not None and key in opt_cfg:
            raise ConfigError(f"optimizer.{key}={opt_cfg[key]}: {text} ({opt_cfg.get('_target_')})") from None
        raise ConfigError(f"optimizer ({opt_cfg.get('_target_')}): {text}") from None


#: scheduler.<argument> → its check (OneCycleLR, CosineAnnealingLR, StepLR ...): torch takes most of these
#: silently (div_factor=-1 gives negative learning rates) or fails deep inside fit (pct_start=0 divides by zero)
_SCHEDULER_VALUES = {
    "pct_start": lambda v, k: checks.fraction(v, k, 0.25, low_open=True, high_open=True),
    "div_factor": lambda v, k: checks.number(v, k, 0, None, 25.0, low_open=True),
    "final_div_factor": lambda v, k: checks.number(v, k, 0, None, 10000.0, low_open=True),
    "max_lr": lambda v, k: checks.number(v, k, 0, None, 0.003, low_open=True),
    "eta_min": lambda v, k: checks.number(v, k, 0, None, 0.0),
    "total_steps": lambda v, k: checks.whole(v, k, 1, None, 1000),
    "T_max": lambda v, k: checks.whole(v, k, 1, None, 1000),
    "step_size": lambda v, k: checks.whole(v, k, 1, None, 10),
    "gamma": lambda v, k: checks.number(v, k, 0, None, 0.1, low_open=True),
    "anneal_strategy": lambda v, k: checks.choice(v, k, ("cos", "linear")),
}


def check_scheduler_values(sched_cfg: Mapping[str, Any]) -> None:
    """The ``scheduler`` group's arguments, each named in one line when bad.

    Raises:
        ConfigError: e.g. ``scheduler.pct_start=0: give a number from 0 (excluded) to 1 (excluded), e.g. 0.25``.
    """
    for key, check in _SCHEDULER_VALUES.items():
        if sched_cfg.get(key) is not None:
            check(sched_cfg[key], f"scheduler.{key}")


def check_scheduler(sched_cfg: Mapping[str, Any], optimizer: torch.optim.Optimizer, steps: int = 100) -> None:
    """Check the ``scheduler`` values and build it for ``optimizer`` once (a dry run over ``steps``).

    Raises:
        ConfigError: A bad value, or an argument the scheduler class rejects (named with the class).
    """
    check_scheduler_values(sched_cfg)
    try:
        build_scheduler(sched_cfg, optimizer, steps)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to build is a bad scheduler config
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"scheduler ({sched_cfg.get('_target_')}): {text}") from None


def build_scheduler(sched_cfg: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                    steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The ``scheduler`` config made for ``optimizer``, planned for a run of ``steps`` optimizer steps.

    ``total_steps`` (OneCycleLR) / ``T_max`` (CosineAnnealingLR) are filled with ``steps`` unless the
    config gives them: the run's length is known only once the trainer has the data.

    Args:
        sched_cfg: The ``scheduler`` group (``_target_`` + arguments).
        optimizer: The optimizer to schedule.
        steps: The run's optimizer steps (``trainer.estimated_stepping_batches``).
    """
    check_scheduler_values(sched_cfg)
    cfg = {**sched_cfg, "_partial_": True}
    factory = hydra.utils.instantiate(cfg)
    params = inspect.signature(factory.func).parameters
    if "pct_start" in params:  # OneCycleLR divides by its warm-up length: keep it ≥ 1 step
        pct = float(cfg.get("pct_start", params["pct_start"].default))
        steps = max(steps, math.ceil(2 / pct) + 1)
    extra = {k: steps for k in ("total_steps", "T_max") if k in params and k not in cfg}
    return factory(optimizer, **extra)


class Optimization:
    """Param groups, optimizer and per-step scheduler of a LightningModule, and the rule to step it.

    The module calls :meth:`configure` from ``configure_optimizers`` and :meth:`step_scheduler` from
    ``lr_scheduler_step``. Callbacks that set learning rates themselves read :attr:`groups`; one that
    declares ``needs_layer_groups = True`` gets one pair of groups per layer group (see
    :func:`param_groups`).

    Args:
        optimizer: ``_target_`` config of a ``torch.optim`` optimizer (None: AdamW, lr 1e-3).
        scheduler: ``_target_`` config of a ``torch.optim.lr_scheduler`` class, stepped every batch, or None.
        weight_decay_norm_bias: Also decay norm weights and biases.
    """

    def __init__(self, optimizer: Mapping[str, Any] | None = None, scheduler: Mapping[str, Any] | None = None,
                 weight_decay_norm_bias: bool = False) -> None:
        self.optimizer_cfg = dict(optimizer or DEFAULT_OPTIMIZER)
        self.scheduler_cfg = dict(scheduler) if scheduler else None
        self.weight_decay_norm_bias = bool(weight_decay_norm_bias)
        self.groups: list[GroupInfo] = []  # of the optimizer last built, in its param_groups order
        self._warned_cycle_end = False

    def configure(self, net: nn.Module, trainer: pl.Trainer) -> Any:
        """What ``configure_optimizers`` returns: the optimizer, with its scheduler when one is configured.

        Args:
            net: The network whose parameters are optimized.
            trainer: The module's trainer (its callbacks and its number of optimizer steps).
        """
        torch_groups, infos = param_groups(net, self.weight_decay_norm_bias,
                                           layerwise=wants_layer_groups(trainer.callbacks))
        optimizer = build_optimizer(self.optimizer_cfg, torch_groups)
        self.groups = [replace(info, lr=float(g["lr"])) for info, g in zip(infos, optimizer.param_groups)]
        if not self.scheduler_cfg:
            return optimizer
        scheduler = build_scheduler(self.scheduler_cfg, optimizer, int(trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def step_scheduler(self, scheduler: Any, metric: Any = None) -> None:
        """Step ``scheduler``, except past the end of a one-cycle plan: there hold its final lr, warn once.

        A resumed run given more epochs than its one-cycle was planned for would make OneCycleLR raise.
        """
        total = getattr(scheduler, "total_steps", None)
        # OneCycleLR allows total_steps calls to step() (last_epoch counts them); the last training
        # batch makes the last one, so only a call beyond that is a run longer than planned
        if total is not None and scheduler.last_epoch >= total:
            if not self._warned_cycle_end:
                self._warned_cycle_end = True
                rank_zero_warn("the one-cycle schedule has ended (resumed with more epochs than planned?): "
                               "the extra steps use its final learning rate")
            return
        scheduler.step() if metric is None else scheduler.step(metric)


TUNE_DEFAULTS = {"lr_find": False, "use_suggestion": False, "min_lr": 1e-7, "max_lr": 1.0, "num_training": 100,
                 "mode": "exponential", "early_stop_threshold": 4.0, "suggest": "valley"}
TUNE_RULES = ("valley", "steepest")


def check_tune(given: dict[str, Any]) -> dict[str, Any]:
    """The ``tune`` values over the defaults; the finder's own values only matter when ``lr_find`` is on.

    Raises:
        ConfigError: An unknown key or a bad value, named (``tune.min_lr=-1: give a number > 0, e.g. 1e-07``).
    """
    unknown = sorted(set(given) - set(TUNE_DEFAULTS))
    if unknown:
        raise ConfigError(f"tune.{unknown[0]}: unknown key (known: {', '.join(TUNE_DEFAULTS)})")
    opts = {**TUNE_DEFAULTS, **given}
    opts["lr_find"] = checks.flag(opts["lr_find"], "tune.lr_find")
    opts["use_suggestion"] = checks.flag(opts["use_suggestion"], "tune.use_suggestion")
    if not opts["lr_find"]:
        return opts
    low = checks.number(opts["min_lr"], "tune.min_lr", 0, None, 1e-7, low_open=True)
    checks.number(opts["max_lr"], "tune.max_lr", low, None, 1.0, low_open=True)
    checks.whole(opts["num_training"], "tune.num_training", 20, 100000, 100,
                 also=" (the suggestion skips the first 10 steps)")
    if opts["early_stop_threshold"] is not None:
        checks.number(opts["early_stop_threshold"], "tune.early_stop_threshold", 1, None, 4.0, low_open=True,
                      also=" or null (never stop early)")
    checks.choice(opts["mode"], "tune.mode", ("exponential", "linear"))
    checks.choice(opts["suggest"], "tune.suggest", TUNE_RULES)
    return opts


def tune_settings(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.tune`` over the defaults (the ``tune`` node may be absent from older configs), checked."""
    return check_tune(dict(cfg.get("tune") or {}))
