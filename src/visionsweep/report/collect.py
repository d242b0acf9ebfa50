"""Runs on disk → jobs → configurations: what the report is computed from.

A job is one run dir (``run.json``, ``metrics.csv``, ``.hydra/``); a sweep dir holds numbered job dirs.
Jobs that differ only in ``seed`` (and, in a k-fold sweep, ``data.fold``) form one configuration, whose
metrics are summarised over those replicates: seeds, or folds.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from visionsweep.errors import ConfigError
from visionsweep.report.stats import mean_ci

METRIC_PREFERENCE = ("val/acc_best", "val/miou_best", "val/miou", "val/acc", "test/acc")
LOWER_IS_BETTER = re.compile(r"loss|error|err$")
REPLICATE_KEYS = ("seed", "data.fold")  # what a configuration is summarised over


@dataclass
class Job:
    """One run dir, read back."""

    path: Path
    status: str
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
        return [j for j in self.jobs if j.status == "ok"]

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


def read_curves(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch series of every ``val/*`` and ``train/*`` metric in a Lightning metrics.csv."""
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    if not metrics_csv.is_file():
        return {}
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            for key, value in row.items():
                if key and key.startswith(("val/", "train/")) and value not in ("", None):
                    curves[key][int(float(row["epoch"]))] = float(value)
    return {k: sorted(v.items()) for k, v in curves.items()}


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return None


def load_job(job_dir: Path) -> Job:
    """Read one run dir.

    A failed job's run.json says so (``status: failed`` with ``error`` and ``error_type``, written by the
    job itself: :func:`visionsweep.outcome.failure`); a dir without run.json (a job killed before it
    could write one) is ``unknown``.
    """
    run = json.loads((job_dir / "run.json").read_text()) if (job_dir / "run.json").is_file() else {}
    overrides = _load_yaml(job_dir / ".hydra" / "overrides.yaml") or run.get("overrides") or []
    cfg = _load_yaml(job_dir / "config.yaml") or _load_yaml(job_dir / ".hydra" / "config.yaml") or {}
    omap = dict(o.split("=", 1) for o in overrides if "=" in o)
    seed = run.get("seed", omap.get("seed", cfg.get("seed")))
    data = cfg.get("data") or {}
    fold = omap.get("data.fold", data.get("fold") if data.get("folds") else None)
    status = str(run.get("status") or "unknown")
    return Job(
        path=job_dir, status=status, error=run.get("error") if status != "ok" else None,
        error_type=run.get("error_type") if status != "ok" else None, overrides=[str(o) for o in overrides],
        seed=int(seed) if seed is not None and str(seed).lstrip("-").isdigit() else None,
        arch=str(run.get("backbone") or (cfg.get("model") or {}).get("backbone") or omap.get("model", "?")),
        augmentation=str(run.get("augmentation") or (cfg.get("augmentation") or {}).get("name")
                         or omap.get("augmentation", "?")),
        metrics={k: float(v) for k, v in (run.get("metrics") or {}).items() if isinstance(v, (int, float))},
        curves=read_curves(job_dir / "metrics.csv"), info=run,
        fold=int(fold) if fold is not None and str(fold).isdigit() else None,
    )


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
    raise ConfigError("report: no finished job has a metric to compare (did every job fail?)")


def higher_is_better(metric: str) -> bool:
    """Losses and errors go down; everything else (acc, iou, f1) goes up."""
    return not LOWER_IS_BETTER.search(metric)


def curve_metric(metric: str) -> str:
    """The per-epoch series behind a final metric (``val/acc_best`` → ``val/acc``)."""
    return metric.removesuffix("_best").replace("test/", "val/")


def best_epoch(job: Job, metric: str) -> int | None:
    """Epoch (0-based) where the job's curve of ``metric`` was best."""
    series = job.curves.get(curve_metric(metric))
    if not series:
        return None
    pick = max if higher_is_better(metric) else min
    return pick(series, key=lambda ev: ev[1])[0]
