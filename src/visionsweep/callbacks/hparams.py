"""Log a job's labels (arch, aug, seed and the overrides that vary in its sweep) to every logger.

TensorBoard and MLflow label themselves (:mod:`visionsweep.dashboards`); this callback gives the same
hyper-parameters to the others: the CSV logger's ``hparams.yaml`` in the run dir and the wandb run's
config, whose parallel-coordinates view reads config keys, not tags.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from visionsweep.dashboards import job_params


class JobHParams(pl.Callback):
    """On fit start, ``logger.log_hyperparams(job params)`` for every logger of the trainer.

    Final metrics need no second call: every logger already holds them as the last value of each
    metric (``val/acc``, ``test/acc``, …), which is what the dashboards' comparison tables show.

    Args:
        arch: The backbone name (``model.backbone``).
        aug: The augmentation preset (``augmentation.name``).
        seed: The job's seed.
    """

    def __init__(self, arch: Any = None, aug: Any = None, seed: Any = None) -> None:
        self.arch, self.aug, self.seed = arch, aug, seed

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the job's hyper-parameters once the loggers exist (not in the constructor: a
        resumed or re-run job reads its overrides from Hydra at run time)."""
        params = job_params(self.arch, self.aug, self.seed)
        for logger in trainer.loggers:  # the dashboards' loggers take them again without harm
            logger.log_hyperparams(params)
