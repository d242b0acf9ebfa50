"""What each configuration costs beside what it scores: the cost columns, Pareto fronts and time to a target.

Everything comes from what the jobs recorded (run.json's ``cost``, ``perf.val_elapsed_s``, metrics.csv):
the report never re-times a model. Older jobs without ``cost`` still have ``params.total`` and
``fit_seconds``, used for ``params`` and ``train_s``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from visionsweep.report.collect import Configuration, Job, curve_metric  # noqa: E402
from visionsweep.analysis.plots import save_plot  # noqa: E402
from visionsweep.utils.text import plain  # noqa: E402
from visionsweep.runinfo import Status, higher_is_better  # noqa: E402

# the summary columns, in order (means over a configuration's finished jobs; device_hours is their sum)
MEAN_COLUMNS = ("params", "macs", "latency_ms", "throughput_img_s", "train_s", "train_img_s")
# Pareto fronts: summary column of the flag → the cost axis, and the PNG it is drawn in
FRONTS = {"pareto": ("latency_ms", "pareto_latency.png"), "pareto_train_s": ("train_s", "pareto_train_s.png"),
          "pareto_params": ("params", "pareto_params.png")}
TARGET_FRACTION = 0.99
_OLD_FIELDS = {"params": ("params", "total"), "train_s": ("fit_seconds", None),
               "train_img_s": ("train_images_per_s", None)}  # jobs recorded before ``cost``


def job_cost(job: Job, key: str) -> float | None:
    """A finite number from the job's ``cost`` (or its pre-``cost`` field), else None."""
    value = (job.info.get("cost") or {}).get(key)
    if value is None and key in _OLD_FIELDS:
        field, sub = _OLD_FIELDS[key]
        value = job.info.get(field)
        value = value.get(sub) if sub and isinstance(value, dict) else value
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


# inference is timed on the network alone: its numbers depend on what it is and where it ran, not on how it was
# trained, so the report pools them over every job with the same key (below) instead of ranking timing noise
INFERENCE = ("latency_ms", "throughput_img_s")
_NETWORK = ("params", "macs", "image_size", "device", "throughput_batch")


def _network(job: Job) -> tuple[Any, ...] | None:
    cost = job.info.get("cost") or {}
    key = (job.info.get("backbone"), *(cost.get(k) for k in _NETWORK))
    return key if all(v is not None for v in key[:4]) else None


def pooled_inference(jobs: list[Job]) -> dict[tuple[Any, ...], dict[str, float]]:
    """Mean latency and throughput per network (backbone, params, MACs, input size, device, batch) over ``jobs``."""
    groups: dict[tuple[Any, ...], list[Job]] = {}
    for job in jobs:
        if job.status == Status.OK and (key := _network(job)) is not None:
            groups.setdefault(key, []).append(job)
    return {key: {k: _mean([job_cost(j, k) for j in group]) for k in INFERENCE} for key, group in groups.items()}


def _mean(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else math.nan


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[bool]:
    """Which (metric, cost) points no other point dominates; lower cost is better.

    A point is dominated when another one is at least as good in both metric and cost and strictly
    better in one, so equal points are all on the front. A point with a NaN (or infinite) value is never on
    the front and dominates nothing.

    Args:
        points: ``(metric, cost)`` per configuration.
        higher_is_better: direction of the metric.

    Returns:
        One flag per point, in order.
    """
    sign = 1.0 if higher_is_better else -1.0
    good = [(sign * m, -c) if math.isfinite(m) and math.isfinite(c) else None for m, c in points]
    valid = [g for g in good if g is not None]
    return [g is not None and not any(o[0] >= g[0] and o[1] >= g[1] and o != g for o in valid) for g in good]


def time_to_target(jobs: list[Job], metric: str, fraction: float = TARGET_FRACTION) -> dict[str, Any] | None:
    """The target every job is timed to: ``fraction`` × the best value of the curve metric over ``jobs``.

    For a lower-is-better metric the target is ``best / fraction``.

    Args:
        jobs: the report's jobs (only finished ones count).
        metric: the ranking metric; its per-epoch series (:func:`collect.curve_metric`) is used.
        fraction: how close to the best a job must come.

    Returns:
        ``{"metric", "target", "fraction", "best"}``, or None when no finished job has that curve.
    """
    key = curve_metric(metric)
    values = [v for j in jobs if j.status == Status.OK for _, v in j.curves.get(key) or [] if math.isfinite(v)]
    if not values:
        return None
    up = higher_is_better(metric)
    best = max(values) if up else min(values)
    return {"metric": key, "target": best * fraction if up else best / fraction, "fraction": fraction, "best": best}


def job_time_to_target(job: Job, target: dict[str, Any]) -> float | None:
    """Seconds since the fit started at which the job's first epoch at or past the target was logged.

    Returns:
        The elapsed seconds (``perf.val_elapsed_s``) of that epoch; None when the job never reached the
        target or did not record that epoch's time.
    """
    up = higher_is_better(target["metric"])
    reached = [e for e, v in sorted(job.curves.get(target["metric"]) or [])
               if (v >= target["target"] if up else v <= target["target"])]
    if not reached:
        return None
    elapsed = {int(e): float(s) for e, s in (job.info.get("perf") or {}).get("val_elapsed_s") or []}
    seconds = elapsed.get(reached[0])
    return seconds if seconds is not None and math.isfinite(seconds) else None


def add_columns(rows: list[dict[str, Any]], configs: list[Configuration], metric: str,
                target: dict[str, Any] | None) -> None:
    """Add the cost columns, time to target and the Pareto flags to the summary rows (in place).

    Args:
        rows: :func:`render.summary_rows`, one per configuration (``configuration`` is its label).
        configs: the configurations.
        metric: the ranking metric (its ``<metric> mean`` column is the Pareto fronts' metric).
        target: :func:`time_to_target`, or None.
    """
    by_label = {c.label: c for c in configs}
    pooled = pooled_inference([j for c in configs for j in c.ok])
    for row in rows:
        ok = by_label[row["configuration"]].ok
        for key in MEAN_COLUMNS:
            if key in INFERENCE:  # the same network timed anywhere in the sweep: one number
                row[key] = _mean([pooled[n][key] if (n := _network(j)) in pooled else job_cost(j, key) for j in ok])
            else:
                row[key] = _mean([job_cost(j, key) for j in ok])
        for key in ("params", "macs"):  # counts: whole numbers in the CSV
            row[key] = int(round(row[key])) if math.isfinite(row[key]) else row[key]
        times = [job_time_to_target(j, target) for j in ok] if target else []
        row["time_to_target_s"] = _mean(times)
        row["reached_target"] = f"{sum(t is not None for t in times)}/{len(ok)}" if target else ""
        row["peak_mem_mb"] = _mean([job_cost(j, "peak_mem_mb") for j in ok])
        hours = [h for h in (job_cost(j, "device_hours") for j in ok) if h is not None]
        row["device_hours"] = float(sum(hours)) if hours else math.nan
    up = higher_is_better(metric)
    for flag, (axis, _) in FRONTS.items():
        front = pareto_front([(r[f"{metric} mean"], float(r[axis])) for r in rows], up)
        for row, on in zip(rows, front):
            row[flag] = on
    # the flags right after time to target, as the columns are documented
    order = [*MEAN_COLUMNS, "time_to_target_s", "reached_target", *FRONTS, "peak_mem_mb", "device_hours"]
    for row in rows:
        for key in order:
            row[key] = row.pop(key)


# decimals of the added numeric columns in the human tables (params and macs: :func:`si`)
_DECIMALS = {"latency_ms": 2, "throughput_img_s": 1, "train_s": 1, "train_img_s": 1, "time_to_target_s": 1,
             "peak_mem_mb": 1, "temperature": 3, "ece_before": 4, "ece_after": 4}  # the last: calibration.COLUMNS


def human(key: str, value: Any) -> str | None:
    """How the human tables show a column this module or calibration.py adds (None: another column)."""
    if key in FRONTS:
        return "✓" if value is True else ""
    if key == "reached_target":
        return value or "—"
    if key not in (*_DECIMALS, "params", "macs", "device_hours"):
        return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    if key in ("params", "macs"):
        return si(value)
    return f"{value:.3g}" if key == "device_hours" else f"{value:.{_DECIMALS[key]}f}"


def si(value: float) -> str:
    """``11689512`` → ``11.7M``, ``1.82e9`` → ``1.82G`` (three significant digits)."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _two_five(value: float, _: Any = None) -> str:
    """Minor tick labels of a log axis: only 2× and 5× a power of ten (the others would overlap)."""
    return si(value) if value > 0 and round(value / 10 ** math.floor(math.log10(value))) in (2, 5) else ""


def front_lines(rows: list[dict[str, Any]], metric: str, esc: Callable[[Any], str] = str) -> list[str]:
    """One line per Pareto front that has configurations on it: its cost axis and their labels (``esc``-aped)."""
    lines = []
    for flag, (axis, _) in FRONTS.items():
        on = [esc(r["configuration"]) for r in rows if r.get(flag)]
        if on:
            lines.append(f"Pareto front of {esc(metric)} against {axis} (no configuration is as good and cheaper): "
                         + "; ".join(on) + ".")
    return lines


def target_sentence(target: dict[str, Any] | None, esc: Callable[[Any], str] = str) -> str | None:
    """``time to target: seconds until val/acc first reached 0.9801 (0.99 × the best, 0.99)``."""
    if not target:
        return None
    fraction = target["fraction"]
    how = f"{fraction:g} × the best" if higher_is_better(target["metric"]) else f"the best ÷ {fraction:g}"
    return (f"time to target: seconds until {esc(target['metric'])} first reached {target['target']:.4g} "
            f"({how}, {target['best']:.4g}).")


def plot_pareto(rows: list[dict[str, Any]], metric: str, flag: str, path: Path) -> Path | None:
    """The metric (mean ± 95 % CI) against one cost axis, one point per configuration, the front ringed.

    Returns:
        ``path``, or None when no configuration has both numbers.
    """
    axis = FRONTS[flag][0]
    pts = [r for r in rows if math.isfinite(r[f"{metric} mean"]) and math.isfinite(float(r[axis]))]
    if not pts:
        return None
    x = np.array([float(r[axis]) for r in pts])
    y = np.array([r[f"{metric} mean"] for r in pts])
    ci = np.array([0.0 if math.isnan(r[f"{metric} ci95"]) else r[f"{metric} ci95"] for r in pts])
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.errorbar(x, y, yerr=ci, fmt="o", color="#4C72B0", ecolor="#888888", capsize=3, zorder=2)
    front = [i for i, r in enumerate(pts) if r[flag]]
    if front:
        order = sorted(front, key=lambda i: (x[i], -y[i] if higher_is_better(metric) else y[i]))
        ax.step(x[order], y[order], where="post", color="#d62728", lw=1.2, zorder=1)
        ax.scatter(x[front], y[front], s=160, facecolors="none", edgecolors="#d62728", lw=1.8, zorder=3,
                   label="Pareto front")
        ax.legend(fontsize=8, loc="best")
    # labels above and below in turn, along the x axis: neighbours (often one network) do not overprint
    for k, i in enumerate(np.lexsort((y, x))):
        ax.annotate(plain(pts[i]["configuration"]), (x[i], y[i]), textcoords="offset points",
                    xytext=(6, 6 if k % 2 == 0 else -12), fontsize=7)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: si(v)))  # 10M, not 10⁷
    if x.min() > 0 and x.max() / x.min() > 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: si(v)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_two_five))
    better = "higher" if higher_is_better(metric) else "lower"
    ax.set(xlabel=plain(f"{axis} (lower is better)"), ylabel=plain(f"{metric} ({better} is better)"),
           title=plain(f"{metric} against {axis}: mean ± 95% CI, Pareto front ringed"))
    ax.grid(alpha=0.3)
    return save_plot(fig, path)


def plot_time_to_target(configs: list[Configuration], target: dict[str, Any] | None, path: Path) -> Path | None:
    """The curve metric against wall-clock seconds: each job thin, the configuration's mean bold, the target dashed.

    Returns:
        ``path``, or None without a target or without any job that recorded its epochs' times.
    """
    if not target:
        return None
    key = target["metric"]
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for c in configs:
        lines = []
        for job in c.ok:
            elapsed = {int(e): float(s) for e, s in (job.info.get("perf") or {}).get("val_elapsed_s") or []}
            line = {e: (elapsed[e], v) for e, v in job.curves.get(key) or [] if e in elapsed}
            if line:
                lines.append(line)
        if not lines:
            continue
        colour = f"C{drawn % 10}"
        for line in lines:
            xs, ys = zip(*line.values())
            ax.plot(xs, ys, color=colour, lw=0.7, alpha=0.45)
        epochs = sorted(set.intersection(*(set(line) for line in lines)))
        if epochs:  # the mean over jobs, epoch by epoch (time and value)
            ax.plot([np.mean([line[e][0] for line in lines]) for e in epochs],
                    [np.mean([line[e][1] for line in lines]) for e in epochs], color=colour, lw=2.2,
                    label=plain(f"{c.label} (n={len(lines)})"))
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(target["target"], ls="--", color="black", lw=1, label=plain(f"target {target['target']:.4g}"))
    ax.set(xlabel="seconds since the fit started", ylabel=plain(key),
           title=plain(f"time to target: {key} against wall-clock time (bold: mean per epoch)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_plot(fig, path)

