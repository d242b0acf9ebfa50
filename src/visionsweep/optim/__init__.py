"""The optimizer side of training, shared by every LightningModule of ours.

- :mod:`~visionsweep.optim.param_groups`: parameter groups (no weight decay on norms/biases, optional
  layer-wise groups) and the typed :class:`GroupInfo` that callbacks read, with fastai's
  discriminative learning-rate spread.
- :mod:`~visionsweep.optim.optimization`: the optimizer from its Hydra config, the per-step scheduler
  sized from the trainer, and the rule for stepping it (:class:`Optimization`).
- :mod:`~visionsweep.optim.lr_find`: the learning-rate finder run before training (``tune.lr_find=true``).
"""

from visionsweep.optim.optimization import Optimization, build_optimizer, build_scheduler
from visionsweep.optim.param_groups import GroupInfo, discriminative_lrs, param_groups

__all__ = ["GroupInfo", "Optimization", "build_optimizer", "build_scheduler", "discriminative_lrs",
           "param_groups"]
