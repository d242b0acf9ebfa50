"""Runs on disk → jobs → configurations: what the report is computed from.

A job is one run dir (``run.json``, ``metrics.csv``, ``.hydra/``); a sweep dir holds numbered job dirs.
Jobs that differ only in ``seed`` (and, in a k-fold sweep, ``data.fold``) form one configuration, whose
metrics are summarised over those replicates: seeds, or folds.

Any of these files may be damaged (cut off by a kill, edited, garbage): nothing is computed from a damaged
part, and one warning line per file says what was left out (a row, the job's curves, a field, the job).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionsweep.errors import ConfigError, DataError
from visionsweep.ledger import read_json_object, read_yaml
from visionsweep.runinfo import STATUSES, Status, best_point, read_curves
from visionsweep.report.stats import mean_ci

log = logging.getLogger(__name__)

METRIC_PREFERENCE = ("val/acc_best", "val/miou_best", "val/map_best", "val/miou", "val/acc", "val/map", "test/acc")
# losses, errors and the calibration scores (expected calibration error, negative log-likelihood, Brier)
REPLICATE_KEYS = ("seed", "data.fold")  # what a configuration is summarised over
# run.json fields the report reads besides status and metrics, and the types they must have (or null)
RUN_FIELDS: dict[str, tuple[type, ...]] = {
    "seed": (int,), "backbone": (str,), "augmentation": (str,), "error": (str,), "error_type": (str,),
    "overrides": (list,), "fit_seconds": (int, float), "train_images_per_s": (int, float), "params": (dict,),
    "cost": (dict,), "calibration": (dict,), "reliability": (dict,), "perf": (dict,), "data": (dict,)}
# numbers inside those objects: each must be a number or null where present (else it alone is ignored)
NESTED_NUMBERS = {
    "cost": ("params", "trainable_params", "macs", "image_size", "latency_ms", "latency_ms_p90", "latency_calls",
             "throughput_img_s", "throughput_batch", "peak_mem_mb", "train_s", "train_img_s", "device_hours",
             "onnx_latency_ms"),
    "calibration": ("temperature", "ece_before", "ece_after", "nll_before", "nll_after", "brier_before",
                    "brier_after")}
LEFT_OUT = "job left out of the report"


@dataclass
class Job:
    """One run dir, read back."""

    path: Path
    status: Status
    error: str | None
    overrides: list[str]
    seed: int | None
    arch: str
    augmentation: str
    metrics: dict[str, float]
    curves: dict[str, list[tuple[int, float]]]
    info: dict[str, Any]
    error_type: str | None = None  # e.g. ConfigError, DataError, RuntimeError (failed jobs)
    label: str = ""
    fold: int | None = None  # k-fold sweeps: the validation fold (data.fold)

    def override_map(self) -> dict[str, str]:
        """``key → value`` of the job's command-line overrides."""
        return dict(o.split("=", 1) for o in self.overrides if "=" in o)


@dataclass
class Configuration:
    """Jobs that differ only by seed (or fold)."""

    label: str
    arch: str
    augmentation: str
    jobs: list[Job] = field(default_factory=list)

    @property
    def ok(self) -> list[Job]:
        """Jobs that finished."""
        return [j for j in self.jobs if j.status == Status.OK]

    @property
    def unit(self) -> str:
        """What the replicates are: ``folds`` in a k-fold sweep, else ``seeds``."""
        return "folds" if any(j.fold is not None for j in self.jobs) else "seeds"

    def values(self, metric: str) -> dict[tuple[int, int], float]:
        """(seed, fold) → final value of ``metric`` over finished jobs (fold -1 outside k-fold)."""
        out = {}
        for i, job in enumerate(self.ok):
            value = job.metrics.get(metric)
            if value is not None and math.isfinite(value):
                seed = job.seed if job.seed is not None else -1 - i
                out[(seed, job.fold if job.fold is not None else -1)] = value
        return out

    def stat(self, metric: str) -> tuple[float, float]:
        """Mean and 95 % CI half-width of ``metric`` over seeds (or folds)."""
        return mean_ci(list(self.values(metric).values()))


def find_job_dirs(paths: list[Path]) -> list[Path]:
    """Every run dir under ``paths`` (a run dir has ``run.json`` or Hydra's ``.hydra/``)."""
    found: set[Path] = set()
    for root in paths:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"report: '{root}' is not a folder (give a sweep dir or run dirs)")
        for marker in ("run.json", ".hydra/overrides.yaml"):
            found.update(p.parent if marker == "run.json" else p.parent.parent for p in root.rglob(marker))
    # the sweep dir itself has a multirun.yaml, not a job: keep only dirs that look like jobs
    return sorted((d for d in found if (d / "run.json").is_file() or (d / ".hydra" / "config.yaml").is_file()),
                  key=_job_sort_key)


def _job_sort_key(path: Path) -> tuple:
    return (str(path.parent), int(path.name) if path.name.isdigit() else math.inf, path.name)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_run(job_dir: Path) -> tuple[dict[str, Any], set[str]]:
    """A job's run.json with every field the report reads checked: ``({}, set())`` without one.

    Returns:
        The content, minus fields of the wrong type (a warning names the file and them), and the names
        of those fields; ``metrics`` keeps only numbers.

    Raises:
        DataError: run.json is damaged (not JSON, not an object, no valid status, metrics not an
            object): the message names it and says the job is left out.
    """
    path = job_dir / "run.json"
    run, problem = read_json_object(path)
    if problem:
        raise DataError(f"{problem}: {LEFT_OUT}")
    if run is None:
        return {}, set()
    if run.get("status") not in STATUSES:
        raise DataError(f"{path} has status {_short(run.get('status'))} (not one of {', '.join(STATUSES)}): "
                        f"{LEFT_OUT}")
    metrics = run.get("metrics")
    if metrics is not None and not isinstance(metrics, dict):
        raise DataError(f"{path} has metrics {_short(metrics)} (not a JSON object): {LEFT_OUT}")
    wrong = {k for k, types in RUN_FIELDS.items()
             if run.get(k) is not None and not (isinstance(run[k], types) and not isinstance(run[k], bool))}
    if "overrides" not in wrong and not _strings(run.get("overrides") or []):
        wrong.add("overrides")
    if isinstance(run.get("params"), dict) and not _number(run["params"].get("total"), missing_ok=True):
        wrong.add("params")
    notes = [f"{k} {_short(run[k])}" for k in RUN_FIELDS if k in wrong]
    clean = {k: v for k, v in run.items() if k not in wrong}
    notes += _check_nested(clean)
    notes += [f"metrics[{k!r}] {_short(v)}" for k, v in (metrics or {}).items() if not _number(v)]
    if notes:
        log.warning("%s has values of the wrong type (%s): ignored them", path, "; ".join(notes))
    clean["metrics"] = {k: float(v) for k, v in (metrics or {}).items() if _number(v)}
    return clean, wrong


def _check_nested(run: dict[str, Any]) -> list[str]:
    """Drop the damaged parts inside cost, calibration, reliability, perf and data (in ``run``, copied).

    Returns:
        One note per part dropped, e.g. ``cost['latency_ms'] 'fast'``.
    """
    notes = []
    for name, keys in NESTED_NUMBERS.items():
        if isinstance(run.get(name), dict):
            bad = [k for k in keys if not _number(run[name].get(k), missing_ok=True)]
            notes += [f"{name}[{k!r}] {_short(run[name][k])}" for k in bad]
            run[name] = {k: v for k, v in run[name].items() if k not in bad}
    rel = run.get("reliability")
    if rel is not None and not (_bins(rel) and (rel.get("before") is None or _bins(rel["before"]))):
        notes.append(f"reliability {_short(rel)}")
        del run["reliability"]
    for name, key, ok in (("perf", "val_elapsed_s", _pairs), ("data", "class_counts", _counts)):
        value = (run.get(name) or {}).get(key)
        if value is not None and not ok(value):
            notes.append(f"{name}[{key!r}] {_short(value)}")
            run[name] = {k: v for k, v in run[name].items() if k != key}
    return notes


def _bins(rel: Any) -> bool:
    """Reliability bins: equally long lists of confidence and accuracy (numbers or null) and counts."""
    lists = [rel.get(k) if isinstance(rel, dict) else None for k in ("confidence", "accuracy", "count")]
    return (all(isinstance(v, list) for v in lists) and len({len(v) for v in lists}) == 1
            and all(_number(x, missing_ok=True) for v in lists[:2] for x in v)
            and all(_number(x) and x >= 0 for x in lists[2]))


def _pairs(value: Any) -> bool:
    """``[[epoch, seconds], ...]``."""
    return isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 and all(map(_number, p))
                                           for p in value)


def _counts(value: Any) -> bool:
    """``{split: {class: n}}``."""
    return isinstance(value, dict) and all(isinstance(c, dict) and all(_number(n) and n >= 0 for n in c.values())
                                           for c in value.values())


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _number(value: Any, missing_ok: bool = False) -> bool:
    return (value is None and missing_ok) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _config(path: Path) -> dict[str, Any] | None:
    """A saved config.yaml as a mapping; None when absent or damaged (with a warning naming it)."""
    cfg, problem = read_yaml(path)
    if problem is None and cfg is not None and not isinstance(cfg, dict):
        problem = f"{path} holds {_short(cfg)}, not a config mapping"
    bad = [k for k in ("data", "model", "augmentation") if isinstance(cfg, dict) and cfg.get(k) is not None
           and not isinstance(cfg[k], dict)]
    if problem is None and bad:
        problem = f"{path} has {bad[0]} {_short(cfg[bad[0]])} (not a mapping)"
    if problem:
        log.warning("%s: ignored it", problem)
        return None
    return cfg or None


def _overrides(job_dir: Path, run: dict[str, Any], wrong: set[str]) -> list[str]:
    """The job's command-line overrides: Hydra's overrides.yaml, else run.json's.

    Raises:
        DataError: a source of them is damaged and no other one is left: the job's configuration is unknown.
    """
    path = job_dir / ".hydra" / "overrides.yaml"
    saved, problem = read_yaml(path)
    if problem is None and saved is not None and not _strings(saved):
        problem = f"{path} holds {_short(saved)}, not a list of overrides"
    fallback = run.get("overrides")
    if problem:
        if fallback is None:
            raise DataError(f"{problem}: {LEFT_OUT} (its configuration is unknown)")
        log.warning("%s: used the overrides in run.json instead", problem)
        saved = None
    if not saved and fallback is None and "overrides" in wrong:
        raise DataError(f"{job_dir / 'run.json'} has overrides of the wrong type and there is no "
                        f"{path.name}: {LEFT_OUT} (its configuration is unknown)")
    return list(saved or fallback or [])


def load_job(job_dir: Path) -> Job:
    """Read one run dir.

    A failed job's run.json says so (``status: failed`` with ``error`` and ``error_type``, written by the
    job itself: :func:`visionsweep.runinfo.failure`); a dir without run.json (a job killed before it
    could write one) is ``failed``, its error saying so.

    Raises:
        DataError: the run dir is too damaged to report (see :func:`read_run`); the message names the file.
    """
    run, wrong = read_run(job_dir)
    overrides = _overrides(job_dir, run, wrong)
    cfg = _config(job_dir / "config.yaml") or _config(job_dir / ".hydra" / "config.yaml") or {}
    omap = dict(o.split("=", 1) for o in overrides if "=" in o)
    seed = run["seed"] if run.get("seed") is not None else omap.get("seed", cfg.get("seed"))
    data = cfg.get("data") or {}
    fold = omap.get("data.fold", data.get("fold") if data.get("folds") else None)
    status = Status(run["status"]) if run else Status.FAILED  # (read_run checked it)
    error = run.get("error") if run else "no run.json: the job stopped before writing it"
    return Job(
        path=job_dir, status=status, error=error if status != Status.OK else None,
        error_type=run.get("error_type") if status != Status.OK else None, overrides=overrides,
        seed=int(seed) if seed is not None and str(seed).lstrip("-").isdigit() else None,
        arch=str(run.get("backbone") or (cfg.get("model") or {}).get("backbone") or omap.get("model", "?")),
        augmentation=str(run.get("augmentation") or (cfg.get("augmentation") or {}).get("name")
                         or omap.get("augmentation", "?")),
        metrics=run.get("metrics") or {}, curves=read_curves(job_dir / "metrics.csv"), info=run,
        fold=int(fold) if fold is not None and str(fold).isdigit() else None,
    )


def load_jobs(job_dirs: list[Path], left_out: list[str] | None = None) -> list[Job]:
    """Read every run dir; a damaged one is left out with one warning naming its file.

    Args:
        job_dirs: The run dirs.
        left_out: Gets one line per run dir left out (the report lists them).

    Raises:
        DataError: every run dir is damaged (one line, naming the first).
    """
    jobs, problems = [], []
    for job_dir in job_dirs:
        try:
            jobs.append(load_job(job_dir))
        except DataError as e:
            log.warning("%s", e)
            problems.append(str(e).split(f": {LEFT_OUT}")[0])
            if left_out is not None:
                left_out.append(str(e))
    if problems and not jobs:
        raise DataError(f"report: all {len(problems)} run dirs are damaged, nothing to report "
                        f"(first: {problems[0]}); fix or remove them")
    return jobs


def group_configurations(jobs: list[Job]) -> list[Configuration]:
    """Group jobs into configurations by their overrides, seed and fold excluded; label them by what varies."""
    maps = [j.override_map() for j in jobs]
    keys = list(dict.fromkeys(k for m in maps for k in m if k not in REPLICATE_KEYS))  # command-line order
    varying = [k for k in keys if len({m.get(k) for m in maps}) > 1]
    groups: dict[str, Configuration] = {}
    for job, m in zip(jobs, maps):
        label = " ".join(f"{k}={m[k]}" for k in varying if k in m) or f"{job.arch} + {job.augmentation}"
        job.label = label
        groups.setdefault(label, Configuration(label, job.arch, job.augmentation)).jobs.append(job)
    return list(groups.values())


def choose_metric(jobs: list[Job], metric: str | None = None) -> str:
    """The metric to rank by: ``metric`` if given, else the first of METRIC_PREFERENCE present."""
    present = {k for j in jobs for k in j.metrics}
    if metric:
        if jobs and metric not in present:
            raise ConfigError(f"report --metric {metric}: no job has it; available: {', '.join(sorted(present))}")
        return metric
    for name in METRIC_PREFERENCE:
        if name in present:
            return name
    raise ConfigError("report: no finished job has a metric to compare (did every job fail? "
                      "or are their run.json files damaged: see the warnings above)")


def curve_metric(metric: str) -> str:
    """The per-epoch series behind a final metric (``val/acc_best`` → ``val/acc``)."""
    return metric.removesuffix("_best").replace("test/", "val/")


def best_epoch(job: Job, metric: str) -> int | None:
    """Epoch (0-based) where the job's curve of ``metric`` was best."""
    best = best_point(job.curves.get(curve_metric(metric)) or [], metric)
    return best[0] if best else None
