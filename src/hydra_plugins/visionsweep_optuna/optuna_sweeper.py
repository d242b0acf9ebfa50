"""A Hydra sweeper driven by current Optuna (≥ 4): ``hydra/sweeper=visionsweep_optuna``.

Why not hydra-optuna-sweeper: its last release (1.3.0) pins ``optuna<3`` and that Optuna's sqlite
storage fails under SQLAlchemy 2 (ENVIRONMENT.md), and optuna-dashboard needs Optuna ≥ 3. This plugin
keeps that sweeper's config shape (``direction``, ``n_trials``, ``sampler``, ``storage``, ``params`` in
Hydra's sweep grammar: ``choice(a,b)``, ``interval(0,1)``, ``tag(log, interval(1e-4,1e-1))``,
``range(1,5)``) on Optuna's ask/tell API.

The study lives in ``<sweep dir>/optuna.db`` unless ``storage`` says otherwise; ``n_trials`` is the
study's total, so re-running with ``hydra.sweep.dir=<that dir>`` resumes it (new jobs get new numbers).
A job that fails or returns no value is told to Optuna as FAIL and the search goes on.

``n_jobs`` trials are in flight at any time: when one ends (or is pruned) its result is told and the next
trial is asked and launched at once, so no slot waits for the slowest trial of a batch (Hydra #2257,
#3091). Each trial is its own ``launcher.launch([job])`` call on a thread of this process; the
launcher (joblib, submitit, Ray) still runs the job where it decides. ``batched: true`` keeps the old
mode (ask ``n_jobs``, wait for all): slower, but the trials' parameters then do not depend on which
trial happened to finish first. The basic launcher runs jobs inside this process: one at a time.
"""
# no `from __future__ import annotations`: Hydra execs plugin modules outside sys.modules, where
# dataclasses cannot resolve string annotations.
import logging
import math
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional  # real types: OmegaConf reads these dataclasses

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random | grid-free samplers of optuna.samplers by short name
    seed: Optional[int] = 0


@dataclass
class PrunerConf:
    # median | successive_halving | hyperband | percentile | none; each job reports its per-epoch
    # validation metric (callbacks/optuna_pruning.py) and stops when pruned. Unset arguments keep
    # Optuna's defaults; each pruner takes the ones it knows.
    name: str = "none"
    n_startup_trials: Optional[int] = None   # median / percentile: trials before pruning starts
    n_warmup_steps: Optional[int] = None     # median / percentile: epochs before a trial can be pruned
    interval_steps: Optional[int] = None
    percentile: Optional[float] = None
    min_resource: Optional[Any] = None       # successive_halving / hyperband ("auto" or epochs)
    max_resource: Optional[Any] = None       # hyperband ("auto" or epochs)
    reduction_factor: Optional[int] = None
    min_early_stopping_rate: Optional[int] = None


@dataclass
class VisionSweepOptunaConf:
    _target_: str = "hydra_plugins.visionsweep_optuna.optuna_sweeper.OptunaSweeper"
    direction: str = "maximize"
    n_trials: int = 10
    study_name: Optional[str] = None
    storage: Optional[str] = None  # None: sqlite:///<sweep dir>/optuna.db
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    n_jobs: int = 1  # trials in flight at once (joblib, submitit, Ray run them); the basic launcher: 1
    batched: bool = False  # true: ask n_jobs trials, wait for all of them (reproducible asks, idle slots)
    params: Dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="visionsweep_optuna",
                             node=VisionSweepOptunaConf, provider="visionsweep")

SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler", "qmc": "QMCSampler"}


def distribution(override: Override) -> Any:
    """The Optuna distribution of one parsed sweep override (or its fixed value as a 1-choice)."""
    import optuna.distributions as D

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return D.CategoricalDistribution([v for v in override.sweep_iterator(transformer=lambda x: x)])
    if isinstance(value, RangeSweep):
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return D.IntDistribution(int(value.start), int(value.stop) - 1, step=int(value.step))
        return D.CategoricalDistribution(list(override.sweep_iterator(transformer=lambda x: x)))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return D.IntDistribution(value.start, value.end, log=log_scale)
        return D.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"{override.input_line}: not a sweep; use choice(), range(), interval() or tag(log, ...)")


def make_sampler(name: str, seed: int | None) -> Any:
    """An Optuna sampler by short name, seeded so a search is reproducible."""
    import optuna.samplers

    if name not in SAMPLERS:
        raise ValueError(f"hydra.sweeper.sampler.name={name}: choose from {', '.join(SAMPLERS)}")
    return getattr(optuna.samplers, SAMPLERS[name])(seed=seed)


def mark_interrupted(study: Any) -> list[int]:
    """Mark the trials left RUNNING by a sweep that died as FAIL with user attr ``interrupted``.

    Returns:
        Their trial numbers (they do not count toward ``n_trials``, so as many are asked again).
    """
    import optuna

    stale = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        optuna.trial.Trial(study, t._trial_id).set_user_attr("interrupted", True)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        log.warning("trial %d was interrupted: marked failed, a new trial takes its place", t.number)
    return [t.number for t in stale]


def job_status(result: Any) -> str | None:
    """The ``status`` a finished job wrote in its run.json (``ok``, ``failed``, ``pruned``), if any."""
    import json

    try:  # the job's output dir (working_dir is the cwd, which hydra.job.chdir=false leaves alone)
        out = Path(result.hydra_cfg.hydra.runtime.output_dir)
        return json.loads((out / "run.json").read_text()).get("status")
    except (AttributeError, OSError, TypeError, ValueError):
        return None


def consecutive(trials: list[Any]) -> list[list[Any]]:
    """Trials in runs of consecutive numbers: a launch numbers its jobs from ``initial_job_idx`` on."""
    runs: list[list[Any]] = []
    for t in trials:
        if runs and runs[-1][-1].number + 1 == t.number:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


class OptunaSweeper(Sweeper):
    """Ask Optuna for parameters, keep ``n_jobs`` trials running, tell it each job's result.

    Args:
        direction: ``maximize`` or ``minimize`` the task's return value.
        n_trials: total trials of the study (a resumed study runs only the missing ones).
        study_name: Optuna study name; None uses the sweep dir's name.
        storage: Optuna storage URL; None puts a sqlite file in the sweep dir.
        sampler: ``name`` and ``seed`` of the sampler.
        params: parameter name → Hydra sweep expression.
        pruner: ``name`` and arguments of the pruner (``none``: no pruning).
        n_jobs: trials in flight at once; the launcher decides where they run.
        batched: launch ``n_jobs`` trials together and wait for all before asking more.
    """

    def __init__(self, direction: str, n_trials: int, study_name: str | None, storage: str | None,
                 sampler: Any, params: dict[str, str] | None, pruner: Any = None, n_jobs: int = 1,
                 batched: bool = False) -> None:
        self.direction, self.n_trials = direction, int(n_trials)
        self.study_name, self.storage = study_name, storage
        self.sampler_cfg = sampler
        self.params = dict(params or {})
        self.pruner_cfg = {k: v for k, v in (OmegaConf.to_container(pruner) if isinstance(pruner, DictConfig)
                                             else dict(pruner or {})).items() if v is not None}
        self.n_jobs, self.batched = int(n_jobs), bool(batched)
        if self.n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_jobs={n_jobs}: give an integer >= 1")

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        import optuna

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        searched = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()])
        fixed: list[str] = []
        for override in parser.parse_overrides(arguments):
            if override.is_sweep_override():  # a sweep on the command line joins the search space
                searched.append(override)
            else:
                fixed.append(override.input_line)
        space = {o.get_key_element(): distribution(o) for o in searched}

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from visionsweep.utils.atomic import atomic_write

        atomic_write(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config))  # a resumed study rewrites it
        storage = self.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
        from visionsweep.callbacks.optuna_pruning import make_pruner

        study = optuna.create_study(
            study_name=self.study_name or sweep_dir.name, storage=storage, direction=self.direction,
            sampler=make_sampler(self.sampler_cfg.name, self.sampler_cfg.seed),
            pruner=make_pruner(self.pruner_cfg), load_if_exists=True)
        study.set_user_attr("sweep_dir", str(sweep_dir))
        mark_interrupted(study)
        done = sum(not t.user_attrs.get("interrupted") for t in study.trials)  # interrupted: asked again
        if study.trials and self.sampler_cfg.seed is not None:
            # a resumed study: the same seed would replay the first trials' parameters
            study.sampler = make_sampler(self.sampler_cfg.name, int(self.sampler_cfg.seed) + len(study.trials))
        log.info("Optuna study %s (%s): %d of %d trials done, %d at once, pruner %s; space: %s",
                 study.study_name, storage, done, self.n_trials, self.n_jobs,
                 self.pruner_cfg.get("name", "none"), ", ".join(space))
        in_flight = self._in_flight()
        self._export_thread_budget(in_flight)
        run = self._run_batched if self.batched or in_flight == 1 else self._run_unbatched
        returns = run(study, space, fixed, storage, self.n_trials - done, in_flight)
        self._save_results(study, sweep_dir)
        return returns

    def _in_flight(self) -> int:
        """Trials at once: ``n_jobs``, or 1 under the basic launcher (it runs jobs in this process)."""
        from visionsweep import parallel

        launcher = self.config.hydra.launcher
        target = str(launcher.get("_target_", "")).lower()
        if self.n_jobs > 1 and "basic" in target:
            log.warning("hydra.sweeper.n_jobs=%d needs a launcher that runs jobs apart (hydra/launcher=joblib, "
                        "submitit_local, submitit_slurm, ray): the basic launcher runs one trial at a time", self.n_jobs)
            return 1
        if "joblib" in target:  # joblib with one job at a time runs it in the calling thread, i.e. here
            return max(1, min(self.n_jobs, parallel.launcher_concurrency(launcher, parallel.node_cores())))
        return self.n_jobs

    def _export_thread_budget(self, in_flight: int) -> None:
        """Threads per trial for ``threads=auto``: the node's cores / the trials running at once on it."""
        from visionsweep import parallel

        parallel.export_thread_budget(self.config, in_flight)
        if "ray" in str(self.config.hydra.launcher.get("_target_", "")).lower():
            import ray  # started once here, as the launcher would, before trials launch from threads

            if not ray.is_initialized():
                ray.init(**OmegaConf.to_container(self.config.hydra.launcher.ray.init, resolve=True))

    def _job(self, trial: Any, fixed: list[str], storage: str) -> list[str]:
        return fixed + [f"{k}={v}" for k, v in trial.params.items()] + [self._trial_env(trial, storage)]

    def _run_batched(self, study: Any, space: dict, fixed: list[str], storage: str, todo: int,
                     in_flight: int) -> list[Any]:
        """Ask ``in_flight`` trials, launch them together, tell every result, repeat."""
        returns = []
        while todo > 0:
            batch = [study.ask(space) for _ in range(min(in_flight, todo))]
            todo -= len(batch)
            for run in consecutive(batch):  # job dir = trial number: a re-asked trial never reuses a dir
                jobs = [self._job(t, fixed, storage) for t in run]
                self.validate_batch_is_legal(jobs)
                results = self.launcher.launch(jobs, initial_job_idx=run[0].number)
                for trial, result in zip(run, results):
                    self._tell(study, trial, result)
                returns.append(list(results))
        return returns

    def _run_unbatched(self, study: Any, space: dict, fixed: list[str], storage: str, todo: int,
                       in_flight: int) -> list[Any]:
        """Keep ``in_flight`` trials running: each ending trial is told, and the next one asked, at once.

        Asks and tells stay on this thread (one Optuna client); a daemon thread per trial only waits
        on ``launcher.launch`` (a Ctrl-C here is not held up by them).
        """
        import optuna

        done: queue.Queue = queue.Queue()
        running, returns = 0, []

        def launch(trial: Any, job: list[str]) -> None:
            try:
                done.put((trial, self.launcher.launch([job], initial_job_idx=trial.number), None))
            except BaseException as e:  # the launcher itself broke: re-raised on the sweep's thread
                done.put((trial, None, e))

        while todo > 0 or running:
            while running < in_flight and todo > 0:
                trial = study.ask(space)
                job = self._job(trial, fixed, storage)
                self.validate_batch_is_legal([job])
                threading.Thread(target=launch, args=(trial, job), daemon=True,
                                 name=f"trial-{trial.number}").start()
                running, todo = running + 1, todo - 1
            trial, results, error = done.get()
            running -= 1
            if isinstance(error, Exception):  # this trial could not be launched: the search goes on
                log.error("trial %d failed to launch: %s", trial.number, error)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            if error is not None:  # KeyboardInterrupt, SystemExit: trials in flight stay RUNNING (resumable)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise error
            self._tell(study, trial, results[0])
            returns.append(list(results))
        return returns

    def _trial_env(self, trial: Any, storage: str) -> str:
        """The override that hands a job its trial (read by callbacks/optuna_pruning.py)."""
        import json

        from visionsweep.callbacks.optuna_pruning import ENV

        info = json.dumps({"storage": storage, "study": trial.study.study_name, "number": trial.number,
                           "pruner": self.pruner_cfg}, separators=(",", ":"))
        return f"++hydra.job.env_set.{ENV}='{info}'"

    @staticmethod
    def _tell(study: Any, trial: Any, result: Any) -> None:
        """Tell Optuna how the job ended: its value, PRUNED (run.json says so) or FAIL."""
        import optuna

        from visionsweep.runinfo import Status

        try:
            value = result.return_value
        except Exception as e:  # the job raised: record it and go on with the search
            log.error("trial %d failed: %s", trial.number, e)
            value = None
        if job_status(result) == Status.PRUNED:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif value is None or not math.isfinite(float(value)):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, float(value))

    @staticmethod
    def _save_results(study: Any, sweep_dir: Path) -> None:
        import optuna

        from visionsweep.utils.atomic import atomic_write

        completed = [t for t in study.trials if t.value is not None]
        pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
        result: dict[str, Any] = {"study_name": study.study_name, "n_trials": len(study.trials),
                                  "n_complete": len(completed) - len(pruned), "n_pruned": len(pruned)}
        if completed:
            result.update(best_value=study.best_value, best_params=study.best_params,
                          best_trial=study.best_trial.number)
            log.info("best trial %d: %s = %s", study.best_trial.number, study.best_params, study.best_value)
        atomic_write(sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(OmegaConf.create(result)))
