"""Hydra's basic (grid) sweeper with a ledger: ``hydra/sweeper=visionsweep_basic`` (our default).

Re-running the identical sweep command (same ``hydra.sweep.dir``) resumes the sweep: every job dir's
run.json is read first (visionsweep.ledger) and
  * ok / pruned with the same config hash → skipped: not launched at all, since a launcher rewrites
    ``.hydra/*`` and the log of every job it starts, and the dir stays byte-for-byte as it was;
  * running (the sweep died under it; or stopped by Ctrl-C / SIGTERM) → launched with ``ckpt_path=<job>/checkpoints/last.ckpt``;
  * failed, missing, damaged (an unreadable run.json: one warning line) or running without a checkpoint
    → launched from scratch.
A sweep dir holding a different sweep (other overrides, or a job whose config differs) is refused in
one line naming the first difference. Jobs keep their numbers: consecutive pending jobs of a batch go
to the launcher together, with their first number as ``initial_job_idx``. Before each launch the
jobs' thread budget goes into the environment of the processes the launcher starts
(visionsweep.parallel).
"""
# no `from __future__ import annotations`: Hydra execs plugin modules outside sys.modules, where
# dataclasses cannot resolve string annotations.
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)

@dataclass
class VisionSweepBasicConf:
    _target_: str = "hydra_plugins.visionsweep_basic.basic_sweeper.VisionSweepBasicSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="visionsweep_basic",
                             node=VisionSweepBasicConf, provider="visionsweep")


def quote(value: str) -> str:
    """A value as a Hydra override can carry it whatever its characters (paths with spaces, '=')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def with_checkpoint(overrides: Sequence[str], ckpt: Path) -> List[str]:
    """A job's overrides resuming from ``ckpt`` (an earlier ``ckpt_path=`` is replaced)."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
    return kept + [f"ckpt_path={quote(str(ckpt.resolve()))}"]


def task_overrides(cfg: Any) -> Dict[str, str]:
    """key → value of the task overrides a sweep was started with, minus those of where / how jobs run
    (the ledger's excluded keys: ``threads``, ``ckpt_path``, ``gpus.*``, ...)."""
    from visionsweep.ledger import EXCLUDED

    out: Dict[str, str] = {}
    for line in list(OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or []):
        key, _, value = str(line).partition("=")
        if key.lstrip("+~").replace("/", ".").split(".")[0] not in EXCLUDED:
            out[key] = value
    return out


def overrides_difference(old: Dict[str, str], new: Dict[str, str]) -> Optional[str]:
    """The first override whose value differs between two sweep commands, as ``key: old -> new``."""
    for key in list(old) + [k for k in new if k not in old]:
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key, '<absent>')} -> {new.get(key, '<absent>')}"
    return None


class VisionSweepBasicSweeper(BasicSweeper):
    """Grid sweeper that reads the sweep dir's ledger before launching (see the module docstring).

    Args:
        max_batch_size: jobs per batch handed to the launcher (None: all at once).
        params: sweep parameters, as for Hydra's basic sweeper.
    """

    def __init__(self, max_batch_size: Optional[int], params: Optional[Dict[str, str]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)

    def sweep(self, arguments: List[str]) -> Any:
        from visionsweep.errors import ConfigError
        from visionsweep.utils.cli import fail

        try:
            return self._sweep(arguments)
        except ConfigError as e:  # one line and exit 2, not Hydra's traceback report
            fail(str(e))

    def _sweep(self, arguments: List[str]) -> Any:
        from visionsweep import ledger, parallel
        from visionsweep.utils.atomic import atomic_write

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        params = self._parse_config() + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides(params), self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        plan = self._plan(sweep_dir, self.overrides)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config))  # a resumed sweep rewrites it
        actions = {num: action for num, action, _ in plan}
        skipped = sum(a == "skip" for a in actions.values())
        if skipped:
            log.info("sweep dir %s: %d of %d jobs already done, skipped", sweep_dir, skipped, len(plan))
        returns = []
        starts = {sum(len(b) for b in self.overrides[:i]) for i in range(len(self.overrides))}
        for run in self._runs(plan, starts):
            first = run[0][0]
            batch = [overrides for _, _, overrides in run]
            self.validate_batch_is_legal(batch)
            parallel.export_thread_budget(self.config, len(batch))
            results = self.launcher.launch(batch, initial_job_idx=first)
            for r in results:
                _ = r.return_value  # a job that raised (not a user error) stops the sweep, as in Hydra's
            returns.append(results)
        self.batch_index = len(self.overrides)
        ledger.write(sweep_dir, actions)
        return returns

    def _plan(self, sweep_dir: Path, batches: Sequence[Sequence[Sequence[str]]]) -> List[Tuple[int, str, List[str]]]:
        """(job number, run | resume | skip, overrides) for every job, checked against the ledger."""
        from visionsweep import ledger
        from visionsweep.errors import ConfigError
        from visionsweep.runinfo import Status

        saved = sweep_dir / "multirun.yaml"
        old, problem = ledger.read_yaml(saved)
        if problem or (old is not None and not isinstance(old, dict)):
            log.warning("%s: not checked against this sweep's overrides (it is rewritten with them)",
                        problem or f"{saved} is not a YAML mapping")
        elif old is not None:
            diff = overrides_difference(task_overrides(OmegaConf.create(old)), task_overrides(self.config))
            if diff:
                raise ConfigError(f"hydra.sweep.dir={sweep_dir} holds a different sweep ({diff}); "
                                  "use another hydra.sweep.dir or the original command")
        entries = ledger.read(sweep_dir)
        jobs = [list(job) for batch in batches for job in batch]
        if entries and max(entries) >= len(jobs):
            raise ConfigError(f"hydra.sweep.dir={sweep_dir} holds job {max(entries)} but this sweep has "
                              f"{len(jobs)} jobs; use another hydra.sweep.dir or the original command")
        plan = []
        for num, overrides in enumerate(jobs):
            entry = entries.get(num)
            if entry is not None and entry.status == "damaged":  # cannot be trusted: neither skipped nor resumed
                log.warning("%s: job %d will be re-run", entry.problem, num)
            if entry is None or entry.status in ("missing", "damaged"):
                plan.append((num, "run", overrides))
                continue
            self._check_same_config(sweep_dir / str(num), entry, overrides)
            if entry.status in (Status.OK, Status.PRUNED):
                plan.append((num, "skip", overrides))
            elif entry.interrupted and entry.last_ckpt is not None:
                log.info("job %d was interrupted: resuming from %s", num, entry.last_ckpt)
                plan.append((num, "resume", with_checkpoint(overrides, entry.last_ckpt)))
            else:
                plan.append((num, "run", overrides))
        return plan

    def _check_same_config(self, job_dir: Path, entry: Any, overrides: List[str]) -> None:
        """Refuse a job dir whose recorded config is not the one this command composes."""
        from visionsweep import ledger
        from visionsweep.errors import ConfigError

        assert self.hydra_context is not None and self.config is not None
        composed = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(composed):
            del composed["hydra"]
        if entry.config_hash is not None and entry.config_hash == ledger.config_hash(composed):
            return
        # no hash (a run from before hashes, or one that failed early) or another one: Hydra's saved
        # .hydra/config.yaml decides, and names the first difference
        old = ledger.saved_config(job_dir)
        diff = ledger.first_difference(old, composed) if old is not None else None
        if old is None and entry.config_hash is not None:
            diff = f"config hash {entry.config_hash} -> {ledger.config_hash(composed)}"
        if diff is not None:
            raise ConfigError(f"hydra.sweep.dir={job_dir.parent}: job {job_dir.name} was run with another "
                              f"config ({diff}); use another hydra.sweep.dir or the original command")

    @staticmethod
    def _runs(plan: List[Tuple[int, str, List[str]]], batch_starts: set) -> List[List[Tuple[int, str, List[str]]]]:
        """Maximal runs of consecutive job numbers to launch (skipped jobs and batch starts split them)."""
        runs: List[List[Tuple[int, str, List[str]]]] = []
        for item in plan:
            if item[1] == "skip":
                continue
            if runs and runs[-1][-1][0] == item[0] - 1 and item[0] not in batch_starts:
                runs[-1].append(item)
            else:
                runs.append([item])
        return runs
