"""Report each epoch's validation metric to the job's Optuna trial and stop the job when it is pruned.

The Optuna sweeper hands a job its trial through the environment (``hydra.job.env_set``, which every
Hydra launcher applies in the job's own process: joblib, submitit, Ray): the study's storage, name,
trial number and pruner. Outside an Optuna sweep the callback does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)
# JSON: {"storage", "study", "number", "pruner": {"name", ...}}; builders.OPTUNA_TRIAL_ENV is the same name
# (without it, builders does not build this callback)
ENV = "VISIONSWEEP_OPTUNA_TRIAL"


def make_pruner(spec: dict[str, Any] | None) -> Any:
    """An Optuna pruner from ``{"name": median|successive_halving|hyperband|percentile|none, **args}``.

    Args:
        spec: The sweeper's ``pruner`` config as a dict (None: no pruning). Arguments the chosen pruner
            does not take, and unset (None) ones, are left out.
    """
    import inspect

    import optuna.pruners as P

    spec = dict(spec or {})
    name = str(spec.pop("name", "none") or "none")
    kinds = {"median": P.MedianPruner, "successive_halving": P.SuccessiveHalvingPruner,
             "hyperband": P.HyperbandPruner, "percentile": P.PercentilePruner, "none": P.NopPruner}
    if name not in kinds:
        raise ValueError(f"hydra.sweeper.pruner.name={name}: choose from {', '.join(kinds)}")
    takes = inspect.signature(kinds[name]).parameters
    return kinds[name](**{k: v for k, v in spec.items() if v is not None and k in takes})


def current_trial() -> Any | None:
    """The Optuna trial this job runs (None outside an Optuna sweep)."""
    raw = os.environ.get(ENV)
    if not raw:
        return None
    import optuna

    info = json.loads(raw)
    study = optuna.load_study(study_name=info["study"], storage=info["storage"],
                              pruner=make_pruner(info.get("pruner")))
    trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == info["number"])
    return optuna.trial.Trial(study, trial_id)


class OptunaPruning(pl.Callback):
    """Per-epoch ``monitor`` → ``trial.report``; a pruned trial stops training after this epoch.

    Args:
        monitor: The metric the study optimises (``${optimized_metric}``); null disables the callback.
    """

    def __init__(self, monitor: str | None = None) -> None:
        self.monitor = monitor
        self.pruned_at: int | None = None
        self._active, self._trial = False, None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every DDP rank inherits the job's environment; only rank 0 talks to the study
        self._active = bool(self.monitor and os.environ.get(ENV))
        self._trial = current_trial() if self._active and trainer.is_global_zero else None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active or trainer.sanity_checking:
            return
        pruned = False
        value = trainer.callback_metrics.get(self.monitor)
        if self._trial is not None and value is not None and math.isfinite(float(value)):
            self._trial.report(float(value), step=trainer.current_epoch)
            pruned = self._trial.should_prune()
        if trainer.strategy.reduce_boolean_decision(pruned, all=False):  # the same decision on every rank
            self.pruned_at = trainer.current_epoch
            log.info("pruned after epoch %d (%s=%s)", trainer.current_epoch, self.monitor,
                     None if value is None else round(float(value), 4))
            trainer.should_stop = True
