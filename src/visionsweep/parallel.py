"""Thread budget of a job: ``threads=auto`` shares this node's cores among the jobs running on it.

The launcher decides how many jobs run at once on a node (joblib ``n_jobs``, submitit
``tasks_per_node``, Ray ``num_cpus`` per task, 1 for the basic launcher); ``auto`` gives each job
cores // that, so parallel jobs never oversubscribe (and a DDP job shares its budget among its
ranks). The ThreadBudget Hydra callback applies it, ``apply_threads(job_threads(cfg, launcher_cfg))``,
in each job's process before the task runs: the one place threads are set. OpenMP reads its
environment once, when torch loads it, so the sweeper also exports ``launch_env`` to the processes
a launcher starts (joblib's loky workers inherit the parent's environment; joblib keeps a
variable that is already set). An ``OMP_NUM_THREADS`` set outside (the shell, SLURM, a test runner)
caps ``auto`` for every job, single or in a sweep: :func:`outside_threads` keeps it apart from the
value we write.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# set by our sweepers for the jobs they launch: how many run at once on a node (the sweeper knows the
# batch, e.g. submitit's local executor starts a whole batch at once); a job's own config cannot say
JOBS_PER_NODE_VAR = "VISIONSWEEP_JOBS_PER_NODE"
# "<OMP_NUM_THREADS before we set it>:<the value we set>", inherited by every process we start
OUTSIDE_THREADS_VAR = "VISIONSWEEP_OUTSIDE_THREADS"


def node_cores() -> int:
    """Cores this process may run on (its affinity: cgroups / SLURM / taskset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    getter = getattr(cfg, "get", None)
    value = getter(key, default) if getter else getattr(cfg, key, default)
    return default if value is None else value


def concurrent_jobs(launcher_cfg: Mapping[str, Any] | Any, cores: int | None = None) -> int:
    """How many jobs of a sweep run at once on one node under this launcher config.

    Args:
        launcher_cfg: ``hydra.launcher`` (its ``_target_`` names the launcher); None: the basic one.
        cores: this node's cores (default: ``node_cores()``).
    """
    cores = cores or node_cores()
    if os.environ.get(JOBS_PER_NODE_VAR, "").isdigit():
        return max(1, int(os.environ[JOBS_PER_NODE_VAR]))
    return launcher_concurrency(launcher_cfg, cores)


def launcher_concurrency(launcher_cfg: Mapping[str, Any] | Any, cores: int, batch_size: int | None = None) -> int:
    """Jobs at once on a node by the launcher config alone (``batch_size``: the batch being launched).

    Args:
        launcher_cfg: ``hydra.launcher``.
        cores: this node's cores.
        batch_size: jobs in the batch; submitit's local executor starts them all at once.
    """
    target = str(_get(launcher_cfg, "_target_", "")).lower()
    if "submitit" in target and "local" in target and batch_size:
        return max(1, batch_size)
    if "joblib" in target:
        n = int(_get(launcher_cfg, "n_jobs", -1))
        n = max(1, cores + 1 + n if n < 0 else n)  # joblib: -1 = all cores, -2 = all but one
        return min(n, batch_size) if batch_size else n
    if "submitit" in target:
        return max(1, int(_get(launcher_cfg, "tasks_per_node", 1)))
    if "ray" in target:
        remote = _get(launcher_cfg, "ray", {}) or {}
        per_task = float(_get(_get(remote, "remote", {}), "num_cpus", 1))
        return max(1, int(cores // max(per_task, 1e-9)))
    return 1


def resolve_threads(value: Any, launcher_cfg: Mapping[str, Any] | Any = None, cores: int | None = None) -> int:
    """The number of threads one job uses.

    Args:
        value: ``auto`` (or None) or a positive integer.
        launcher_cfg: ``hydra.launcher`` of the sweep (None: one job at a time).
        cores: this node's cores (default: ``node_cores()``).

    Raises:
        visionsweep.errors.ConfigError: ``value`` is neither ``auto`` nor an integer ≥ 1.
    """
    from visionsweep.errors import ConfigError

    cores = cores or node_cores()
    if value is None or str(value).strip().lower() == "auto":
        per_task = _get(launcher_cfg, "cpus_per_task")  # submitit: what the scheduler grants a task
        if per_task:
            return max(1, min(int(per_task), cores))
        n = max(1, cores // concurrent_jobs(launcher_cfg, cores))
        return min(n, outside_threads() or n)  # a budget someone set (the shell, SLURM, a test runner)
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"threads={value}: give auto or an integer >= 1")
    return n


def outside_threads() -> int | None:
    """The thread budget set outside visionsweep (None: none): ``OMP_NUM_THREADS``, unless it still holds the
    value :func:`set_thread_env` wrote, in this process or the one that started it; then the one it replaced.
    A value someone sets after ours (a test runner for its child process) is theirs, and counts."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    outside, _, ours = os.environ.get(OUTSIDE_THREADS_VAR, "").partition(":")
    if ours and value == ours:
        value = outside
    return int(value) if value.isdigit() and int(value) > 0 else None


def set_thread_env(env: Mapping[str, str]) -> None:
    """Write ``env`` (from :func:`launch_env`) into this process's environment, noting next to it the outside
    budget it replaces (:func:`outside_threads`), so that our own value is never taken for one."""
    outside = outside_threads()
    os.environ[OUTSIDE_THREADS_VAR] = f"{outside or ''}:{env['OMP_NUM_THREADS']}"
    os.environ.update(env)


def processes_per_node(trainer_cfg: Any) -> int:
    """Training processes this job starts on each node (``trainer.devices`` under a DDP strategy, else 1)."""
    strategy, devices = trainer_cfg.get("strategy"), trainer_cfg.get("devices", 1)
    if not strategy or str(strategy) in ("auto", "single_device") or not str(devices).isdigit():
        return 1
    return max(1, int(devices))


def job_threads(config: Any, launcher_cfg: Any) -> int:
    """Threads of each training process of a job: its ``threads`` budget (:func:`resolve_threads`) shared
    among the DDP ranks it starts on this node (each rank runs this too).

    Raises:
        ConfigError: ``threads`` is not auto or an integer >= 1.
    """
    return max(1, resolve_threads(config.get("threads", "auto"), launcher_cfg)
               // processes_per_node(config.get("trainer") or {}))


def launch_env(threads: int, concurrent: int) -> dict[str, str]:
    """Environment for processes that will import torch: thread counts, passive waits when shared.

    Args:
        threads: threads per job.
        concurrent: jobs running at once on this node.
    """
    env = {var: str(threads) for var in THREAD_VARS}
    if concurrent > 1:
        # an idle OpenMP thread spinning on a shared core steals it from the other job's work
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def apply_threads(n: int, concurrent: int = 1) -> int:
    """Use ``n`` threads in this process and in processes it starts (DataLoader workers excepted).

    Args:
        n: threads for torch's intra-op pool (and inter-op, if torch has not started it yet).
        concurrent: jobs running at once on this node (> 1 adds ``OMP_WAIT_POLICY=PASSIVE`` for children).

    Returns:
        ``n``.
    """
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only possible before the first inter-op work; keep what torch has
        pass
    set_thread_env(launch_env(n, concurrent))
    return n


def export_thread_budget(config: Any, batch_size: int) -> None:
    """Before a sweeper launches ``batch_size`` jobs at once: their thread budget, in this process's
    environment, which the processes a launcher starts inherit (read back by :func:`concurrent_jobs`).

    Args:
        config: the sweep's config (``hydra.launcher``, ``threads``).
        batch_size: jobs the sweeper has running at once.
    """
    launcher_cfg = config.hydra.launcher
    concurrent = launcher_concurrency(launcher_cfg, node_cores(), batch_size)
    os.environ[JOBS_PER_NODE_VAR] = str(concurrent)
    threads = resolve_threads(config.get("threads", "auto"), launcher_cfg)
    set_thread_env(launch_env(threads, concurrent))
    from visionsweep import gpus

    gpus.export_pool()  # jobs see the node's GPUs as this process does (submitit_local hides them)

