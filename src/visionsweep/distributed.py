"""DDP under Hydra: every rank works in rank 0's run dir, and only rank 0 writes the run's files.

Lightning's ``ddp`` strategy starts ranks 1..N-1 by re-running the command line with
``hydra.run.dir=<hydra's run dir>``. Inside a multirun that re-runs the whole sweep (``-m`` and its
sweep axes are on the command line) and the run dir is the wrong one, so each rank ends in a dir of
its own (lightning-hydra-template #393). :class:`DDPStrategy` starts the ranks from the config the
job saved (``<run>/config.yaml``, fully resolved) in the job's own dir instead, with rank 0's split,
so all ranks train the same job on the same data. On a SLURM cluster srun starts every rank itself
(Lightning's SLURM environment); they then compose the same config and share the same dir too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy as _LightningDDP
from pytorch_lightning.strategies.launchers import subprocess_script
from pytorch_lightning.utilities import rank_zero_only

CHILD_RUN_DIR = "VISIONSWEEP_DDP_RUN_DIR"  # set in the environment of ranks started by rank 0


def global_rank() -> int:
    """This process's rank as the launcher set it (0 outside distributed training)."""
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_rank_zero() -> bool:
    """True in the process that owns the run dir and every file in it."""
    return global_rank() == 0


def child_command(run_dir: str | Path) -> tuple[Sequence[str], str]:
    """The command (and cwd) that starts another rank on this node for the job in ``run_dir``.

    Args:
        run_dir: Rank 0's run dir; it holds the resolved ``config.yaml`` and ``splits/``.
    """
    run = Path(run_dir).resolve()
    command = [sys.executable, "-m", "visionsweep.train", "--config-dir", str(run),
               "--config-name", "config", f"hydra.run.dir={run}", "hydra.output_subdir=null",
               # resolved in the child, whose LOCAL_RANK the launcher sets: one log per rank
               "hydra.job.name=ddp_rank${oc.env:LOCAL_RANK,0}",
               f"hydra.job_logging.handlers.file.filename={run}/train_rank${{oc.env:LOCAL_RANK,0}}.log"]
    if (run / "splits").is_dir():
        command.append(f"data.split_dir={run / 'splits'}")
    return command, os.getcwd()


class DDPStrategy(_LightningDDP):
    """Lightning's DDP whose extra ranks run the saved job config in the same run dir.

    Args:
        run_dir: Rank 0's run dir (``${paths.output_dir}``).
        **kwargs: Passed to ``pytorch_lightning.strategies.DDPStrategy`` (``process_group_backend``,
            ``find_unused_parameters``, ...).
    """

    def __init__(self, run_dir: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_dir = os.environ.get(CHILD_RUN_DIR) or run_dir

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        launcher = self._launcher
        if isinstance(launcher, subprocess_script._SubprocessScriptLauncher) and self.run_dir:
            run_dir, call = self.run_dir, launcher._call_children_scripts

            def call_children() -> None:
                os.environ[CHILD_RUN_DIR] = str(run_dir)
                # Hydra or not (a job started from Python), the ranks run the job's saved config
                with mock.patch.object(subprocess_script, "_hydra_subprocess_cmd",
                                       lambda local_rank: child_command(run_dir)), \
                        mock.patch.object(subprocess_script, "_basic_subprocess_cmd",
                                          lambda: child_command(run_dir)[0]):
                    call()

            launcher._call_children_scripts = call_children


def processes_per_node(trainer_cfg: Any) -> int:
    """Training processes this job starts on each node (``trainer.devices`` under a DDP strategy, else 1)."""
    strategy, devices = trainer_cfg.get("strategy"), trainer_cfg.get("devices", 1)
    if not strategy or str(strategy) in ("auto", "single_device") or not str(devices).isdigit():
        return 1
    return max(1, int(devices))


def end_of_fit(trainer: pl.Trainer) -> bool:
    """After a distributed fit: wait for every rank, close the process group; True on rank 0.

    Rank 0 then tests the best checkpoint alone, on every test image exactly once (a distributed
    test pads the last shard with repeated images), and writes run.json.
    """
    import torch.distributed as dist

    if trainer.world_size <= 1:
        return True
    trainer.strategy.barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return trainer.is_global_zero


def tester(trainer: pl.Trainer) -> pl.Trainer:
    """The trainer that runs the test after ``trainer``'s fit: itself, or a one-device one after DDP."""
    if trainer.world_size <= 1:
        return trainer
    return pl.Trainer(accelerator="gpu" if trainer.strategy.root_device.type == "cuda" else "cpu", devices=1,
                      logger=trainer.loggers, callbacks=[], enable_checkpointing=False,
                      enable_model_summary=False, precision=trainer.precision,
                      enable_progress_bar=trainer.progress_bar_callback is not None)
