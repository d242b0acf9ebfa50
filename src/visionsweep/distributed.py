"""DDP under Hydra: every rank works in rank 0's run dir, and only rank 0 writes the run's files.

Lightning's ``ddp`` strategy starts ranks 1..N-1 by re-running the command line with
``hydra.run.dir=<hydra's run dir>``. Inside a multirun that re-runs the whole sweep (``-m`` and its
sweep axes are on the command line) and the run dir is the wrong one, so each rank ends in a dir of
its own (lightning-hydra-template #393). :class:`DDPStrategy` starts the ranks from the config the
job saved (``<run>/config.yaml``, fully resolved) in the job's own dir instead, with rank 0's split,
so all ranks train the same job on the same data. On a SLURM cluster srun starts every rank itself
(Lightning's SLURM environment); they then compose the same config and share the same dir too.

``data.batch_size`` is the global batch: each rank loads ``batch_size / world size`` samples a step
(:func:`rank_batch_size`), so a run on N processes takes the steps of one process, on the same schedule,
and ends at its accuracy. BatchNorm statistics are synchronised across the ranks
(``trainer.sync_batchnorm: auto``) wherever torch can: on GPUs (torch's SyncBatchNorm rejects CPU tensors).
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

from visionsweep.errors import ConfigError
from visionsweep.parallel import processes_per_node  # noqa: F401 - (where it was; the thread budget needs it first)
from visionsweep.utils import checks

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


def rank_batch_size(batch_size: int, devices: int = 1, num_nodes: int = 1) -> int:
    """Each training process's share of the global ``data.batch_size``: ``batch_size / (devices x num_nodes)``.

    Args:
        batch_size: ``data.batch_size``, the batch of one optimizer step summed over every rank.
        devices: Training processes per node (``trainer.devices``).
        num_nodes: Nodes (``trainer.num_nodes``).

    Raises:
        ConfigError: ``batch_size`` does not divide evenly among the processes (one line, with values that do).
    """
    batch, world = int(batch_size), max(1, int(devices)) * max(1, int(num_nodes))
    if batch % world:
        fits = [b for b in (batch // world * world, (batch // world + 1) * world) if b > 0]
        raise ConfigError(
            f"data.batch_size={batch} is the global batch, split evenly among the {world} training processes "
            f"(trainer.devices={devices} x trainer.num_nodes={num_nodes}): use data.batch_size="
            f"{' or '.join(map(str, fits))} (a multiple of {world})")
    return batch // world


def world_size(trainer_cfg: Any) -> int:
    """Training processes of the job on all its nodes: ``trainer.devices x trainer.num_nodes`` under DDP, else 1."""
    per_node, nodes = processes_per_node(trainer_cfg), trainer_cfg.get("num_nodes", 1)
    strategy = trainer_cfg.get("strategy")
    if not strategy or str(strategy) in ("auto", "single_device"):
        return 1
    return per_node * max(1, int(nodes) if str(nodes).isdigit() else 1)


def check_batch_size(cfg: Any) -> int:
    """``cfg``'s ``data.batch_size`` per training process (0 without one); call before anything starts.

    Raises:
        ConfigError: It does not divide among the ``trainer.devices x trainer.num_nodes`` processes.
    """
    batch = (cfg.get("data") or {}).get("batch_size")
    if batch is None:
        return 0
    per_node = processes_per_node(cfg.trainer)
    batch = checks.whole(batch, "data.batch_size", 1, None, 32)
    return rank_batch_size(batch, per_node, world_size(cfg.trainer) // per_node)


#: devices whose tensors torch's SyncBatchNorm takes (torch/nn/modules/batchnorm.py; not CPU, not MPS)
SYNC_BN_DEVICES = ("cuda", "xpu", "hpu")


def _wants_sync(choice: Any, device_type: str) -> bool | None:
    """``trainer.sync_batchnorm`` as a decision for ``device_type`` (None: leave Lightning's)."""
    if choice is None:
        return None
    if isinstance(choice, str):
        word = choice.strip().lower()
        if word == "auto":
            return device_type in SYNC_BN_DEVICES
        if word not in ("true", "false"):
            raise ConfigError(f"trainer.sync_batchnorm={choice}: give auto (synced on GPUs), true or false")
        choice = word == "true"
    if choice and device_type not in SYNC_BN_DEVICES:
        raise ConfigError(f"trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm rejects {device_type} "
                          "tensors): use trainer.sync_batchnorm=auto (synced on GPUs, per rank elsewhere) or false")
    return bool(choice)


class DDPStrategy(_LightningDDP):
    """Lightning's DDP whose extra ranks run the saved job config in the same run dir.

    Before the extra ranks start, it checks that ``data.batch_size`` (the global batch) divides among
    them, and whether BatchNorm can be synchronised on this device.

    Args:
        run_dir: Rank 0's run dir (``${paths.output_dir}``).
        sync_batchnorm: ``auto`` (the default of ``trainer=ddp``): SyncBatchNorm on GPUs, per-rank
            BatchNorm on CPU, where torch's SyncBatchNorm does not run; true (GPUs only) or false;
            None leaves ``Trainer(sync_batchnorm=...)`` to decide.
        **kwargs: Passed to ``pytorch_lightning.strategies.DDPStrategy`` (``process_group_backend``,
            ``find_unused_parameters``, ...).
    """

    def __init__(self, run_dir: str | None = None, sync_batchnorm: bool | str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_dir = os.environ.get(CHILD_RUN_DIR) or run_dir
        self.sync_batchnorm = sync_batchnorm
        _wants_sync(sync_batchnorm, "cuda")  # a bad word fails here, at Trainer construction

    def _device_type(self) -> str:
        devices = self.parallel_devices or []
        return devices[0].type if devices else "cpu"

    def check_job(self, datamodule: Any = None) -> None:
        """Refuse, in one line, a global batch that does not divide among the ranks or SyncBatchNorm on CPU."""
        _wants_sync(self.sync_batchnorm, self._device_type())
        if datamodule is not None and getattr(datamodule, "batch_size", None) is not None:
            rank_batch_size(datamodule.batch_size, self.num_processes, self.num_nodes)

    def setup(self, trainer: pl.Trainer) -> None:
        from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm

        want = _wants_sync(self.sync_batchnorm, self.root_device.type)
        if want is not None:
            self._layer_sync = TorchSyncBatchNorm() if want else None
        super().setup(trainer)

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        launcher = self._launcher
        if launcher is not None:
            launch = launcher.launch

            def checked_launch(function: Any, *args: Any, **kwargs: Any) -> Any:
                # before any other rank starts: trainer.fit(model, ..., datamodule, ...) passes the data here
                found = [a for a in (*args, *kwargs.values()) if isinstance(a, pl.LightningDataModule)]
                self.check_job(found[0] if found else None)
                return launch(function, *args, **kwargs)

            launcher.launch = checked_launch
        if isinstance(launcher, subprocess_script._SubprocessScriptLauncher) and self.run_dir:
            run_dir, call = self.run_dir, launcher._call_children_scripts

            def call_children() -> None:
                _remember_env()
                os.environ[CHILD_RUN_DIR] = str(run_dir)
                # Hydra or not (a job started from Python), the ranks run the job's saved config
                with mock.patch.object(subprocess_script, "_hydra_subprocess_cmd",
                                       lambda local_rank: child_command(run_dir)), \
                        mock.patch.object(subprocess_script, "_basic_subprocess_cmd",
                                          lambda: child_command(run_dir)[0]):
                    call()

            launcher._call_children_scripts = call_children


# what Lightning's launcher (and ours) set in rank 0's own environment to start the other ranks
RANK_ENV = (CHILD_RUN_DIR, "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_saved_env: dict[str, str | None] | None = None


def _remember_env() -> None:
    global _saved_env
    if _saved_env is None:
        _saved_env = {k: os.environ.get(k) for k in RANK_ENV}


def restore_env() -> None:
    """After a DDP job: rank 0's environment as it was before it started its ranks, so the next job of the
    same process (a reused sweep worker) is not taken for a rank of this one (and takes its own GPU lease)."""
    global _saved_env
    for key, value in (_saved_env or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env = None


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
