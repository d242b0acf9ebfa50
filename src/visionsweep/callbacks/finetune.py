"""fastai's ``fine_tune`` as a Lightning callback: train the new head alone, then everything with
discriminative learning rates, each phase with its own one-cycle schedule.

fastai (``Learner.fine_tune``)::

    freeze();   fit_one_cycle(freeze_epochs, base_lr, pct_start=0.99)
    unfreeze(); fit_one_cycle(epochs, slice(base_lr / 2 / lr_mult, base_lr / 2), pct_start=0.3, div=5)

Here ``base_lr`` is ``optimizer.lr`` and ``trainer.max_epochs`` counts both phases. The layer groups
are timm's coarse groups (stem, each stage) followed by the classifier; ``slice(lo, hi)`` spreads
the learning rates geometrically over them (the stem gets ``hi / lr_mult``, the head ``hi``).

BatchNorm of the frozen body: trainable by default (``train_bn=True``), as fastai does. Its affine
parameters are few, and re-estimating the normalisation statistics on the new data set matters when
that data differs from the pre-training data (other image statistics, other size); fastai measured it
to help. ``train_bn=False`` keeps the frozen body an exact feature extractor: BatchNorm layers in eval
mode (running statistics untouched) and their parameters frozen.

The callback sets the learning rates itself each step from ``trainer.global_step``, so it needs
``scheduler=none``, and a resumed run continues both the freezing and the schedule where it stopped.
It declares ``needs_layer_groups``, so the module's :class:`~visionsweep.optim.Optimization` builds one
pair of optimizer groups per layer group, and reads their :class:`~visionsweep.optim.GroupInfo`
(configured lr, depth) from ``pl_module.optimization.groups``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import pytorch_lightning as pl
import torch.nn as nn
from pytorch_lightning.utilities import rank_zero_warn

from visionsweep.errors import ConfigError
from visionsweep.models.backbones import head_parameter_names
from visionsweep.optim import GroupInfo, Optimization, discriminative_lrs

log = logging.getLogger(__name__)


def cos_anneal(start: float, end: float, pos: float) -> float:
    """fastai's ``SchedCos``: cosine from ``start`` (pos 0) to ``end`` (pos 1)."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def one_cycle(pos: float, pct_start: float, div: float, div_final: float) -> float:
    """fastai's one-cycle factor of the peak lr at ``pos`` ∈ [0, 1]: 1/div → 1 → 1/div_final."""
    pos = min(max(pos, 0.0), 1.0)
    if pos < pct_start:
        return cos_anneal(1.0 / div, 1.0, pos / pct_start)
    return cos_anneal(1.0, 1.0 / div_final, (pos - pct_start) / max(1.0 - pct_start, 1e-8))


def set_body_frozen(net: nn.Module, frozen: bool, train_bn: bool = True) -> None:
    """Freeze (``requires_grad=False``) or unfreeze everything but the classifier of a timm model.

    Args:
        net: the timm model.
        frozen: freeze the body (True) or make everything trainable (False).
        train_bn: keep BatchNorm parameters trainable (and the layers in train mode) while frozen;
            False puts the frozen body's BatchNorm layers in eval mode.
    """
    head = head_parameter_names(net)
    bn_params: set[int] = set()
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            bn_params.update(id(p) for p in module.parameters())
            if frozen and not train_bn:
                module.eval()
    for name, p in net.named_parameters():
        p.requires_grad_(not frozen or name in head or (train_bn and id(p) in bn_params))


class FineTune(pl.Callback):
    """Freeze the body for ``freeze_epochs``, then unfreeze with discriminative learning rates.

    Args:
        freeze_epochs: epochs with only the head (and BatchNorm, see ``train_bn``) trained; 0 skips.
        lr_mult: head lr / stem lr after unfreezing (fastai's default 100).
        train_bn: BatchNorm of the frozen body stays trainable (fastai's choice; see module doc).
        pct_start: warm-up fraction of the unfrozen phase's one-cycle.
        div: the unfrozen phase starts at peak / div (fastai's fine_tune uses 5).
        div_final: both phases end at peak / div_final.
        frozen_pct_start: warm-up fraction of the frozen phase (fastai: 0.99).
        frozen_div: the frozen phase starts at peak / frozen_div (fastai's fit_one_cycle: 25).
        freeze_bn_stats: keep every BatchNorm layer in eval mode the whole run (the pre-trained running
            statistics; the affine parameters still train): for tiny batches of a few classes, whose
            batch statistics are too noisy to re-estimate them.
    """

    plans_by_run_length = True  # its schedules follow the run's total steps: a resume must keep them
    needs_layer_groups = True  # one optimizer group per layer group (read by visionsweep.optim)

    def __init__(self, freeze_epochs: int = 1, lr_mult: float = 100.0, train_bn: bool = True,
                 pct_start: float = 0.3, div: float = 5.0, div_final: float = 1e5,
                 frozen_pct_start: float = 0.99, frozen_div: float = 25.0, freeze_bn_stats: bool = False) -> None:
        if int(freeze_epochs) < 0 or float(lr_mult) < 1:
            raise ConfigError(f"fine_tune: freeze_epochs={freeze_epochs} must be ≥ 0 and lr_mult={lr_mult} ≥ 1")
        self.freeze_epochs, self.lr_mult, self.train_bn = int(freeze_epochs), float(lr_mult), bool(train_bn)
        self.pct_start, self.div, self.div_final = float(pct_start), float(div), float(div_final)
        self.frozen_pct_start, self.frozen_div = float(frozen_pct_start), float(frozen_div)
        self.freeze_bn_stats = bool(freeze_bn_stats)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.lr_scheduler_configs:
            raise ConfigError("training=fine_tune sets the learning rates itself (one-cycle per phase): "
                              "use scheduler=none")
        from visionsweep.models.classifier import ClassifierModule  # (the callback is imported by the models)

        if not isinstance(pl_module, ClassifierModule) or not isinstance(
                getattr(pl_module, "optimization", None), Optimization):
            # the body/head split and timm's layer groups are the classifier's; a U-Net has neither
            raise ConfigError(f"training=fine_tune works with the classifier (task=classify), not "
                              f"{type(pl_module).__name__}: fine-tune a segmenter with model.pretrained=true "
                              "and its default schedule")
        if trainer.max_epochs is not None and 0 < trainer.max_epochs <= self.freeze_epochs:
            rank_zero_warn(f"fine_tune: max_epochs={trainer.max_epochs} ≤ freeze_epochs={self.freeze_epochs}: "
                           "the body is never unfrozen")

    def frozen(self, epoch: int) -> bool:
        """Whether the body is frozen in ``epoch``."""
        return epoch < self.freeze_epochs

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every epoch (not just at the switch), so that a resumed run gets the right state too
        frozen = self.frozen(trainer.current_epoch)
        if not frozen:
            pl_module.net.train()  # BatchNorm layers that were kept in eval mode
        set_body_frozen(pl_module.net, frozen, self.train_bn)
        self._bn_eval(pl_module)
        log.info("epoch %d: body %s", trainer.current_epoch, "frozen" if frozen else "trainable")

    def _bn_eval(self, pl_module: pl.LightningModule) -> None:
        if self.freeze_bn_stats:
            for module in pl_module.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._bn_eval(pl_module)  # also after a mid-epoch validation, which puts the model back in train mode
        lrs = self.learning_rates(trainer, pl_module.optimization.groups)
        for group, lr in zip(trainer.optimizers[0].param_groups, lrs):
            group["lr"] = lr

    def learning_rates(self, trainer: pl.Trainer, groups: Sequence[GroupInfo]) -> list[float]:
        """The lr of every optimizer group at the current step.

        Args:
            trainer: The trainer (its step, and the run's total steps and epochs).
            groups: The optimizer's groups, in ``param_groups`` order (their configured lr and depth).
        """
        total = max(int(trainer.estimated_stepping_batches), 1)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        per_epoch = total / epochs
        freeze_steps = min(round(per_epoch * self.freeze_epochs), total)
        step = trainer.global_step
        if step < freeze_steps:
            factor = one_cycle(step / freeze_steps, self.frozen_pct_start, self.frozen_div, self.div_final)
            # one lr for all (fastai's slice(base_lr)): it moves the head and the body's BatchNorm only
            return [float(g.lr) * factor for g in groups]
        factor = one_cycle((step - freeze_steps) / max(total - freeze_steps, 1), self.pct_start, self.div,
                           self.div_final)
        # fastai's fine_tune: slice(base_lr / 2 / lr_mult, base_lr / 2) once unfrozen
        return [lr / 2 * factor for lr in discriminative_lrs(groups, self.lr_mult)]
