"""A job's labels (arch, aug, seed and the overrides that vary in its sweep), for every logger.

:func:`job_params` and :func:`sweep_names` make them: :func:`visionsweep.run_config.label_loggers` names the
wandb and MLflow runs with :func:`sweep_names`, TensorBoard and MLflow log :func:`job_params`
(:mod:`visionsweep.dashboards`, imported only for those loggers); :class:`JobHParams` gives the same
hyper-parameters to the others: the CSV logger's ``hparams.yaml`` in the run dir and the wandb run's
config, whose parallel-coordinates view reads config keys, not tags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only



_PLAIN = (bool, int, float, str)


def _plain(value: Any) -> bool | int | float | str:
    """A value every dashboard can show: scalars as they are, anything else as text."""
    return value if isinstance(value, _PLAIN) else str(value)


def _parse(lines: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(list(lines))
    except Exception:  # an override Hydra already accepted; never fail a job over its labels
        return []


def job_overrides(as_text: bool = False) -> dict[str, Any]:
    """The job's own overrides (``HydraConfig.get().overrides.task``) as ``{key: value}``.

    Args:
        as_text: Values as typed on the command line (``false``, ``1e-3``); else parsed (bool, float…).
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    out: dict[str, Any] = {}
    for o in _parse(list(HydraConfig.get().overrides.task)):
        value = o.value()
        if as_text and value is not None:
            value = o.input_line.split("=", 1)[1]  # Hydra's own str() would turn false into False
        out[o.key_or_group] = None if value is None else _plain(value)
    return out


def varying_keys() -> list[str]:
    """Keys that take several values in this job's sweep ([] outside a multirun).

    They are the sweeper's ``params`` (a grid, or Optuna's search space) plus the sweep overrides of the
    command line (``seed=1,2,3``), which only the sweep's ``multirun.yaml`` still holds: a job sees its
    own values only.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from visionsweep.utils.cli import is_multirun

    if not is_multirun():
        return []
    hc = HydraConfig.get()
    params = hc.sweeper.get("params") or {}
    lines = [f"{k}={v}" for k, v in params.items()]
    saved = Path(hc.sweep.dir) / "multirun.yaml"
    if saved.is_file():  # after the sweeper's params: the command line wins, as in the sweepers
        lines += list(OmegaConf.select(OmegaConf.load(saved), "hydra.overrides.task", default=[]) or [])
    sweeps: dict[str, bool] = {}
    for o in _parse(lines):
        sweeps[o.key_or_group] = o.is_sweep_override()  # `model=resnet18` on the CLI fixes a grid key
    return [key for key, is_sweep in sweeps.items() if is_sweep]


def job_params(arch: Any, aug: Any, seed: Any, all_overrides: bool = False) -> dict[str, Any]:
    """A job's hyper-parameters for a dashboard: arch, aug, seed and its overrides.

    Args:
        arch: The backbone name (``model.backbone``).
        aug: The augmentation preset (``augmentation.name``).
        seed: The job's seed.
        all_overrides: Every override of the job, as typed (MLflow params); else, in a sweep, only
            those that vary in it, parsed (TensorBoard's HParams columns, where constants are noise),
            and every override of a single run.

    Returns:
        ``{"arch": …, "aug": …, "seed": …, "<override key>": value, …}`` with plain values.
    """
    from visionsweep.utils.cli import is_multirun

    overrides = job_overrides(as_text=all_overrides)
    # a single run's overrides are what it was asked to differ in from the defaults: all of them count
    every = all_overrides or not is_multirun()
    keys = list(overrides) if every else [k for k in varying_keys() if k in overrides]
    params: dict[str, Any] = {"arch": _plain(arch), "aug": _plain(aug), "seed": _plain(seed)}
    for key in keys:
        if key == "seed" or overrides[key] is None:  # seed is there already, as the job's value
            continue
        same = {"model": "arch", "augmentation": "aug"}.get(key)
        if not all_overrides and same and str(overrides[key]) == str(params[same]):
            continue  # augmentation=light next to aug=light: one column is enough
        params[key] = overrides[key]
    return params


def sweep_names(task: str, arch: Any, aug: Any, seed: Any) -> tuple[str, str]:
    """``(experiment, run name)``: one experiment per sweep, runs named by what they compare."""
    from hydra.core.hydra_config import HydraConfig

    from visionsweep.utils.cli import is_multirun

    run = f"{arch}-{aug}-seed{seed}"
    if not is_multirun():
        return task, run
    hc = HydraConfig.get()
    return f"{task}-{Path(hc.sweep.dir).name}", f"{run}-job{hc.job.num}"


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
