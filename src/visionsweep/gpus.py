"""GPU leases: the GPUs a job may see, taken when it starts and given back when it ends.

A sweep on one machine (``hydra/launcher=joblib``, ``submitit_local``, the basic launcher, or several
sweeps and single runs side by side) shares the node's GPUs through *leases*: before CUDA
initialises, each job locks ``gpus.per_job`` GPUs (one of ``gpus.jobs_per_gpu`` slots on each) and
sets ``CUDA_VISIBLE_DEVICES`` to them, so ``trainer.devices=1`` is its own GPU. A job that finds
every slot taken waits for one. The launcher still decides where and when jobs run; only the lease
is ours (Hydra #1331, #2757: "a launcher that provides GPU allocation").

A lease is a POSIX record lock (``fcntl.lockf``) on a file per slot in ``gpus.lock_dir`` (default: a
node-local folder under the system temp dir, shared by every sweep of every user on the node). The
kernel drops the lock when the holding process ends, however it ends (SIGKILL included), so a dead
job's lease is free at once; record locks are also not inherited by forked children (DataLoader
workers), which could otherwise keep a finished job's lease. The lock file's text says who holds it.

Ray (``num_gpus``) and SLURM (``gpus_per_node``) hand out their own GPUs: their jobs take no lease.

A process in which CUDA is already initialised (a joblib worker running its second job) can no
longer change what it sees; it leases among the GPUs it was given before, and waits for them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from visionsweep.errors import ConfigError

log = logging.getLogger("visionsweep.gpus")

VISIBLE = "CUDA_VISIBLE_DEVICES"
# the GPUs of the node as the sweep's own process saw them, for jobs started in an environment that hides
# them (submitit's local executor sets CUDA_VISIBLE_DEVICES="" for jobs without gpus_per_node)
POOL_ENV = "VISIONSWEEP_GPU_POOL"
ALL_DEVICES = ("-1", "auto")  # trainer.devices meaning "every GPU": such a job leases the whole pool
POLL_S = 0.25  # how often a waiting job looks for a free slot

_held: Lease | None = None  # this process's lease (one job at a time per process)
_bound: list[str] | None = None  # what CUDA saw in this process when it initialised under a lease
_original_visible: str | None = None  # CUDA_VISIBLE_DEVICES before the first lease in this process
_captured = False
_node: list[str] | None = None  # node_gpus(), counted once per process (before any lease narrows it)
_refused: ConfigError | None = None  # why this process's job got no lease (a bad gpus.* value)


@dataclass
class Lease:
    """GPUs a job holds: their ids (as ``CUDA_VISIBLE_DEVICES`` takes them) and the open lock files.

    Args:
        ids: leased GPU ids, physical (the driver's numbering or UUIDs), in order.
        slots: the lock file of each id's slot.
        started: unix time the lease was taken.
    """

    ids: list[str]
    slots: list[Path] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    _fds: list[int] = field(default_factory=list, repr=False)


def _capture_original() -> None:
    """Remember the GPUs this process was started with, before a lease narrows them."""
    global _captured, _original_visible
    if not _captured:
        _captured, _original_visible = True, os.environ.get(VISIBLE)


def node_gpus() -> list[str]:
    """GPU ids this node lets the process use: its original ``CUDA_VISIBLE_DEVICES``, else all GPUs.

    Counted through NVML (``torch.cuda.device_count``), which does not initialise CUDA.
    """
    global _node
    _capture_original()
    if _node is not None:
        return list(_node)
    if os.environ.get(POOL_ENV) is not None:
        _node = [x for x in os.environ[POOL_ENV].split(",") if x]
        return list(_node)
    if _original_visible is not None:
        _node = [x.strip() for x in _original_visible.split(",") if x.strip() and x.strip() != "-1"]
        return list(_node)
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # no torch build with CUDA, no driver
        count = 0
    _node = [str(i) for i in range(count)]
    return list(_node)


def pool_ids(pool: Sequence[Any] | None) -> list[str]:
    """The ids leases are taken from: ``gpus.pool`` as given, or :func:`node_gpus`.

    Raises:
        ConfigError: ``pool`` is not a list of distinct ids.
    """
    if pool is None:
        return node_gpus()
    if isinstance(pool, (str, int)) or not all(isinstance(x, (str, int)) and str(x).strip() for x in pool):
        raise ConfigError(f"gpus.pool={pool}: give a list of GPU ids, e.g. gpus.pool=[0,1] (null: this node's GPUs)")
    ids = [str(x).strip() for x in pool]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"gpus.pool={pool}: an id is listed twice; give each GPU once")
    _capture_original()
    allowed = [x.strip() for x in (_original_visible or "").split(",") if x.strip()]
    if allowed and not set(ids) <= set(allowed):  # empty: no GPU here, the ids are pretend ones
        raise ConfigError(f"gpus.pool={pool} names GPUs outside {VISIBLE}={_original_visible}, which this "
                          f"command was started with: choose ids among those, or start it without {VISIBLE}")
    return ids


def export_pool() -> None:
    """Before a launcher starts jobs: hand them this process's view of the node's GPUs (:data:`POOL_ENV`)."""
    if os.environ.get(POOL_ENV) is None:
        os.environ[POOL_ENV] = ",".join(node_gpus())


def _positive(key: str, value: Any) -> int:
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"gpus.{key}={value}: use an integer >= 1")
    return n


def _try_lease(candidates: list[str], per_job: int, jobs_per_gpu: int, lock_dir: Path, owner: str) -> Lease | None:
    """``per_job`` distinct GPUs with a free slot each, all or nothing (no partial lease is kept)."""
    from visionsweep.utils import slot_locks  # (a job that leases no GPU never needs it)

    lease = Lease(ids=[])
    # the least loaded GPUs first, so packed jobs spread before they share
    order = sorted(candidates, key=lambda g: sum(slot_locks.busy(slot_locks.slot_file(lock_dir, g, s))
                                               for s in range(jobs_per_gpu)))
    for gpu in order:
        for slot in range(jobs_per_gpu):
            path = slot_locks.slot_file(lock_dir, gpu, slot)
            fd = slot_locks.try_slot(path, owner)
            if fd is not None:
                lease.ids.append(gpu)
                lease.slots.append(path)
                lease._fds.append(fd)
                break
        if len(lease.ids) == per_job:
            lease.started = time.time()
            return lease
    _close(lease)
    return None


def _close(lease: Lease) -> None:
    for fd in lease._fds:
        try:
            os.close(fd)  # closing the fd drops this process's record lock
        except OSError:
            pass
    lease._fds.clear()


def _cuda_initialised() -> bool:
    import sys

    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:
        return False


def acquire(per_job: Any = 1, jobs_per_gpu: Any = 1, pool: Sequence[Any] | None = None,
            lock_dir: Any = None, label: str = "", timeout: float | None = None) -> Lease | None:
    """Lease GPUs for the job about to run in this process and make them the only ones it sees.

    Args:
        per_job: GPUs per job (a DDP job of ``trainer.devices=N`` needs N).
        jobs_per_gpu: jobs that may share one GPU at once (2–4 packs small models).
        pool: GPU ids to lease from; None: this node's GPUs (none: no lease, returns None).
        lock_dir: folder of the lease files; None: :func:`visionsweep.utils.slot_locks.default_lock_dir`.
        label: who holds it, written into the lock files (the job's run dir).
        timeout: seconds to wait for a free slot; None: as long as it takes.

    Returns:
        The lease (also kept as this process's :func:`current` lease), or None when there are no GPUs.

    Raises:
        ConfigError: a key has a bad value, or the pool can never satisfy ``per_job``.
        TimeoutError: no lease within ``timeout`` seconds.
    """
    global _held, _bound
    per_job, jobs_per_gpu = _positive("per_job", per_job), _positive("jobs_per_gpu", jobs_per_gpu)
    release()  # a lease left by this process's previous job (it ended without on_job_end)
    ids = pool_ids(pool)
    if not ids:
        return None
    candidates = ids
    if _cuda_initialised() and _bound is not None:
        candidates = [g for g in ids if g in _bound]  # CUDA here already sees only these
    if len(candidates) < per_job:
        where = "this process can still see" if candidates != ids else "gpus.pool holds"
        raise ConfigError(f"gpus.per_job={per_job} but {where} {len(candidates)} GPU(s) ({','.join(candidates) or '-'}): "
                          f"lower gpus.per_job (or trainer.devices), or widen gpus.pool")
    from visionsweep.utils import slot_locks

    directory = slot_locks.lock_dir(lock_dir)
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "job": label})
    waited = None
    while (lease := _try_lease(candidates, per_job, jobs_per_gpu, directory, owner)) is None:
        if waited is None:
            waited = time.time()
            log.info("waiting for a GPU lease: every slot of %s is held (gpus.jobs_per_gpu=%d, %s)",
                     ",".join(candidates), jobs_per_gpu, directory)
        elif timeout is not None and time.time() - waited > timeout:
            raise TimeoutError(f"no free GPU slot among {','.join(candidates)} within {timeout} s")
        time.sleep(POLL_S * (1 + random.random()))  # jitter: waiting jobs do not poll in step
    if waited is not None:
        log.info("GPU lease after %.1f s of waiting", time.time() - waited)
    _capture_original()
    if not _cuda_initialised():
        os.environ[VISIBLE] = ",".join(lease.ids)
        _bound = list(lease.ids)
    _held = lease
    log.info("GPU lease: %s=%s (gpus.jobs_per_gpu=%d)", VISIBLE, ",".join(lease.ids), jobs_per_gpu)
    return lease


def release() -> None:
    """Give this process's lease back (no-op without one). Process exit does the same.

    The next job of this process (a reused worker) then sees the GPUs the process started with again,
    unless CUDA already started here: it can see no others any more.
    """
    global _held, _bound
    if _held is not None:
        _close(_held)
        _held = None
    if _captured and not _cuda_initialised():
        if _original_visible is None:
            os.environ.pop(VISIBLE, None)
        else:
            os.environ[VISIBLE] = _original_visible
        _bound = None


def current() -> Lease | None:
    """The lease this process holds now, if any.

    Raises:
        ConfigError: the job's ``gpus.*`` values were refused when its lease was taken (a sweep job
            fails on them here, in its own run, instead of running on GPUs it did not lease).
    """
    if _refused is not None:
        raise _refused
    return _held


def device_index(lease: Lease | None) -> int | None:
    """The CUDA index (in this process's view) of the lease's first GPU; None without a lease."""
    indices = device_indices(lease)
    return indices[0] if indices else None


def device_indices(lease: Lease | None) -> list[int] | None:
    """The CUDA indices of the leased GPUs in this process's view: ``[0..n-1]`` when the lease set the view
    (the usual case), their places in the older view when CUDA had started here before (a reused worker)."""
    if lease is None:
        return None
    view = _bound or node_gpus() or lease.ids
    return [view.index(g) if g in view else i for i, g in enumerate(lease.ids)]


def trainer_devices(lease: Lease | None) -> list[int] | None:
    """``trainer.devices`` for a job whose lease is not CUDA's first devices here (a reused worker whose
    CUDA started under an earlier lease): the leased indices; None when ``trainer.devices`` is right as is."""
    indices = device_indices(lease)
    return indices if indices and indices != list(range(len(indices))) else None


def record(lease: Lease | None, on_cuda: bool) -> dict[str, Any] | None:
    """run.json's ``gpu``: ``{"ids", "name", "memory_gb"}`` (name and memory None for a pretend id).

    Args:
        lease: this job's lease (None: the job took none).
        on_cuda: whether the job trains on CUDA.
    """
    ids: list[str] = list(lease.ids) if lease else []
    name = memory = None
    if on_cuda:
        import torch

        index = device_index(lease) if lease else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index or 0)
        name, memory = props.name, round(props.total_memory / 2**30, 1)
        if not ids:
            visible = os.environ.get(VISIBLE)
            ids = [visible.split(",")[index or 0].strip()] if visible else [str(index or 0)]
    if not ids:
        return None
    return {"ids": [int(i) if i.isdigit() else i for i in ids], "name": name, "memory_gb": memory}


def launcher_assigns_gpus(launcher_cfg: Any) -> bool:
    """Ray and SLURM hand out GPUs themselves; a lease there would be a second layer."""
    target = str((launcher_cfg or {}).get("_target_", "") if hasattr(launcher_cfg, "get") else "").lower()
    return "ray" in target or "slurm" in target


def wanted(cfg: Any, launcher_cfg: Any) -> bool:
    """Whether a job with this config takes a lease.

    An explicit ``gpus.pool`` always leases (also on a CPU, as pretend ids); otherwise a training job
    leases when it may train on a GPU (``trainer.accelerator`` not ``cpu``), its launcher does not assign
    GPUs, it is not a rank another launcher started (rank 0 leased for its own ranks), and
    ``trainer.devices`` is a count or "every GPU" (-1, auto: it leases the whole pool); a list of
    indices is the user's own choice and takes no lease.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return False
    # ranks started by srun / torchrun / a multi-task submitit job: their launcher placed them already
    if os.environ.get("TORCHELASTIC_RUN_ID") or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 \
            or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return False
    if launcher_assigns_gpus(launcher_cfg):
        return False
    if cfg.get("gpus") is None:  # eval, predict, export, see: they choose their device themselves
        return False
    gpus = cfg.get("gpus") or {}
    if gpus.get("pool") is not None:
        return True
    trainer = cfg.get("trainer") or {}
    if str(trainer.get("accelerator", "auto")).lower() == "cpu":
        return False
    return str(trainer.get("devices", 1)).isdigit() or str(trainer.get("devices")).strip() in ALL_DEVICES


def acquire_for(cfg: Any, launcher_cfg: Any, label: str = "") -> Lease | None:
    """The lease of one job from its config (``gpus.*`` and ``trainer.devices``), or None.

    Args:
        cfg: the job's config.
        launcher_cfg: ``hydra.launcher`` (None for a single run).
        label: the job's run dir, written into the lock files.
    """
    global _refused
    _refused = None
    if not wanted(cfg, launcher_cfg):
        return None
    gpus = cfg.get("gpus") or {}
    devices = (cfg.get("trainer") or {}).get("devices", 1)
    try:
        per_job = _positive("per_job", gpus.get("per_job", 1))
        if str(devices).isdigit() and int(devices) > per_job:
            per_job = int(devices)  # trainer.devices=N (DDP) needs N GPUs in its lease
        elif str(devices).strip() in ALL_DEVICES:
            per_job = max(1, len(pool_ids(gpus.get("pool"))))  # every GPU: it waits until all are free
        return acquire(per_job, gpus.get("jobs_per_gpu", 1), gpus.get("pool"), gpus.get("lock_dir"), label)
    except ConfigError as e:
        _refused = e
        raise
