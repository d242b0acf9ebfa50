"""Hydra callbacks of visionsweep (registered in conf/hydra/default.yaml).

``SavedConfigDefaults``: Hydra saves a job's composed config as ``.hydra/config.yaml`` without the
``hydra`` node, so ``--config-dir <job>/.hydra --config-name config`` used to compose Hydra's stock
settings and write to ``outputs/<date>/``. Adding ``defaults: [{hydra: default}, _self_]`` to that
file brings our run-dir layout (``runs/<task>/<stamp>/``) back on a re-run; the values are unchanged.
"""
# no `from __future__ import annotations`: Hydra execs plugin modules outside sys.modules
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

DEFAULTS = "defaults:\n- hydra: default\n- _self_\n"


class SavedConfigDefaults(Callback):
    """Make a job's saved ``.hydra/config.yaml`` compose our ``hydra: default`` when re-run."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.hydra.output_subdir:  # hydra.output_subdir=null: nothing saved
            return
        path = Path(config.hydra.runtime.output_dir) / config.hydra.output_subdir / "config.yaml"
        try:
            text = path.read_text()
        except OSError:
            return
        if not text.startswith("defaults:"):
            from visionsweep.utils.atomic import atomic_write

            atomic_write(path, DEFAULTS + text)


class ThreadBudget(Callback):
    """Give each job its thread budget (``threads``: auto or an integer; shared by its DDP ranks) in the
    process that runs it: the one place threads are set.

    Runs in the job's own process (in-process for the basic launcher, in the worker for joblib,
    submitit or Ray) before the task function, whichever launcher started it. The DDP ranks that rank 0
    starts inherit its thread environment (``OMP_NUM_THREADS``, already divided) and run without it.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from visionsweep import parallel
        from visionsweep.errors import ConfigError
        from visionsweep.utils.cli import fail

        multirun = str(config.hydra.mode).endswith("MULTIRUN")
        launcher = config.hydra.launcher if multirun else None  # HydraConfig is not set yet here
        try:
            n = parallel.job_threads(config, launcher)
        except ConfigError as e:
            if not multirun:
                from visionsweep.runinfo import remove_if_only_hydra_files

                remove_if_only_hydra_files(Path(config.hydra.runtime.output_dir))  # a mistake leaves no run dir
                fail(str(e))
            log.error("%s", e)  # the job fails on the same value and records it; the sweep goes on
            return
        parallel.apply_threads(n, parallel.concurrent_jobs(launcher))
        log.info("threads: %d (threads=%s)", n, config.get("threads", "auto"))


class GpuLease(Callback):
    """Lease the job's GPUs (``gpus.*``, visionsweep.gpus) before CUDA initialises; give them back after.

    Runs in the job's own process, after :class:`ThreadBudget`. A process that dies holding a lease
    loses it with its locks, so a killed job never keeps a GPU.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from visionsweep import gpus
        from visionsweep.errors import ConfigError
        from visionsweep.utils.cli import fail

        multirun = str(config.hydra.mode).endswith("MULTIRUN")
        try:
            gpus.acquire_for(config, config.hydra.launcher if multirun else None,
                             label=str(config.hydra.runtime.output_dir))
        except ConfigError as e:
            if not multirun:
                from visionsweep.runinfo import remove_if_only_hydra_files

                remove_if_only_hydra_files(Path(config.hydra.runtime.output_dir))  # a mistake leaves no run dir
                fail(str(e))
            log.error("%s", e)  # the job fails on it (gpus.current() in train) and records it; the sweep goes on

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        import sys

        from visionsweep import gpus

        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():  # a reused worker: free what the job cached
            import gc

            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        gpus.release()
