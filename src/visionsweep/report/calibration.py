"""How far the ranking can be trusted beyond accuracy: calibration (temperature scaling, reliability diagrams)
and the imbalance warning for plain-accuracy rankings.

Everything comes from what the jobs recorded (run.json's ``calibration`` and ``reliability`` bins,
``data.class_counts``): the report never runs a model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from visionsweep.errors import ConfigError  # noqa: E402
from visionsweep.report.collect import Configuration, Job  # noqa: E402
from visionsweep.analysis.plots import save_plot  # noqa: E402
from visionsweep.utils.text import plain  # noqa: E402
from visionsweep.runinfo import Status  # noqa: E402

log = logging.getLogger(__name__)

COLUMNS = ("temperature", "ece_before", "ece_after")
PLAIN_ACCURACY = ("val/acc", "val/acc_best", "test/acc")
BALANCED = ("val/f1_macro", "val/acc_balanced", "test/f1_macro", "test/acc_balanced")  # preferred in this order
IMBALANCE_RATIO = 3.0


def _calibrated(jobs: list[Job]) -> list[dict[str, Any]]:
    return [j.info["calibration"] for j in jobs if j.status == Status.OK and j.info.get("calibration")]


def _num(record: dict[str, Any], key: str) -> float | None:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _mean(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else math.nan


def add_columns(rows: list[dict[str, Any]], configs: list[Configuration]) -> bool:
    """Add ``temperature``, ``ece_before``, ``ece_after`` (means) when any job ran temperature scaling.

    Args:
        rows: the summary rows (``configuration`` is the label), changed in place.
        configs: the configurations.

    Returns:
        Whether the columns were added.
    """
    if not _calibrated([j for c in configs for j in c.jobs]):
        return False
    by_label = {c.label: c for c in configs}
    for row in rows:
        records = _calibrated(by_label[row["configuration"]].jobs)
        for key in COLUMNS:
            row[key] = _mean([_num(r, key) for r in records])
    return True


def temperature_sentence(configs: list[Configuration], esc: Callable[[Any], str] = str) -> str | None:
    """``temperature scaling: ECE 0.081 → 0.023 (mean over 6 jobs ...)``, or None when no job ran it.

    Args:
        configs: the configurations.
        esc: escapes the recorded split names (md_escape for Markdown).
    """
    records = [r for r in _calibrated([j for c in configs for j in c.jobs])
               if _num(r, "ece_before") is not None and _num(r, "ece_after") is not None]
    if not records:
        return None
    n_configs = sum(bool(_calibrated(c.jobs)) for c in configs)
    where = sorted({f"fitted on {esc(r.get('fitted_on', '?'))}, measured on {esc(r.get('measured_on', '?'))}"
                    for r in records})
    return (f"temperature scaling: ECE {_mean([_num(r, 'ece_before') for r in records]):.3f} → "
            f"{_mean([_num(r, 'ece_after') for r in records]):.3f} (mean over {len(records)} jobs in {n_configs} "
            f"configurations; temperature {'; '.join(where)}).")


def pooled_bins(config: Configuration, which: str = "after") -> dict[str, Any] | None:
    """A configuration's reliability bins pooled over its finished jobs.

    Counts are summed; confidence and accuracy are count-weighted means. Jobs with another number of
    bins than the first are left out (they cannot be pooled bin by bin).

    Args:
        config: the configuration.
        which: ``after`` (the recorded bins) or ``before`` (the bins before temperature scaling).

    Returns:
        ``{"confidence", "accuracy", "count", "split", "jobs"}`` (None in an empty bin), or None without bins.
    """
    sets = []
    for job in config.ok:
        rel = job.info.get("reliability")
        bins = (rel or {}).get("before") if which == "before" else rel
        if bins:
            sets.append((bins, rel.get("split")))
    if not sets:
        return None
    n = len(sets[0][0]["count"])
    sets = [s for s in sets if len(s[0]["count"]) == n]
    count = np.zeros(n)
    sums = {"confidence": np.zeros(n), "accuracy": np.zeros(n)}
    one_count, one_right = 0, 0.0  # confidence exactly 1 (models.calibration.reliability_bins)
    for bins, _ in sets:
        one = _at_one(bins)
        if one:
            one_count, one_right = one_count + one[0], one_right + one[0] * one[1]
        for i in range(n):
            if bins["count"][i] and bins["confidence"][i] is not None and bins["accuracy"][i] is not None:
                count[i] += bins["count"][i]
                for key in sums:
                    sums[key][i] += bins["count"][i] * bins[key][i]
    pooled = {key: [float(s / k) if k else None for s, k in zip(v, count)] for key, v in sums.items()}
    at_one = {"count": one_count, "accuracy": one_right / one_count if one_count else None}
    return {**pooled, "count": count.astype(int).tolist(), "at_one": at_one, "split": sets[0][1], "jobs": len(sets)}


def _at_one(bins: dict[str, Any]) -> tuple[int, float] | None:
    """``(count, accuracy)`` of the images whose confidence was exactly 1, when bins record any."""
    one = bins.get("at_one")
    if not isinstance(one, dict):
        return None
    k, acc = one.get("count"), one.get("accuracy")
    ok = isinstance(k, int) and k > 0 and isinstance(acc, (int, float)) and math.isfinite(acc)
    return (k, float(acc)) if ok else None


def ece(bins: dict[str, Any]) -> float:
    """Expected calibration error of bins: the count-weighted mean of ``|accuracy - confidence|`` (torchmetrics'
    definition: the images at confidence exactly 1 are a slot of their own)."""
    one = _at_one(bins)
    total = sum(bins["count"]) + (one[0] if one else 0)
    if not total:
        return math.nan
    gap = sum(k * abs(a - c) for k, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"])
              if k and a is not None and c is not None)
    return float((gap + (one[0] * (1.0 - one[1]) if one else 0.0)) / total)


def pick(configs: list[Configuration], ranked_labels: list[str], label: str | None = None) -> list[Configuration]:
    """The configurations the reliability diagram shows: the best one with bins, and one more.

    Args:
        configs: the configurations.
        ranked_labels: their labels, best first (the summary's order).
        label: the second panel (``--reliability``); default the configuration with the highest test/ece
            (val/ece when no job has test/ece; the pooled bins' ECE when neither).

    Raises:
        ConfigError: ``label`` names no configuration (the message lists them).
    """
    by_label = {c.label: c for c in configs}
    if label is not None and label not in by_label:
        raise ConfigError(f"report --reliability {label!r}: no such configuration; available: "
                          + ", ".join(repr(k) for k in ranked_labels))
    with_bins = [by_label[k] for k in ranked_labels if pooled_bins(by_label[k])]
    if not with_bins:
        return []
    best = with_bins[0]
    if label is not None:
        if not pooled_bins(by_label[label]):
            log.warning("report --reliability %r: that configuration recorded no reliability bins", label)
        return [best] + ([by_label[label]] if by_label[label] is not best and pooled_bins(by_label[label]) else [])
    present = {m for c in configs for j in c.ok for m in j.metrics}
    key = next((m for m in ("test/ece", "val/ece") if m in present), None)

    def worst(c: Configuration) -> float:
        value = c.stat(key)[0] if key else ece(pooled_bins(c))
        return -math.inf if math.isnan(value) else value

    others = [c for c in with_bins if c is not best]
    return [best] + ([max(others, key=worst)] if others else [])


def describe_pick(panels: list[Configuration], esc: Callable[[Any], str] = str) -> str | None:
    """The sentence naming the reliability diagram's panels (labels ``esc``-aped)."""
    if not panels:
        return None
    names = " and ".join(esc(c.label) for c in panels)
    before = any(pooled_bins(c, "before") for c in panels)
    return (f"reliability diagram (reliability.png): {names}; bins pooled over each configuration's jobs"
            + ("; dashed outlines: accuracy before temperature scaling." if before else "."))


def panel(config: Configuration) -> tuple[str, dict[str, Any]]:
    """A configuration's reliability diagram panel: its label and pooled bins (``before`` when recorded)."""
    return config.label, {**pooled_bins(config), "before": pooled_bins(config, "before")}


def plot_reliability(panels: list[tuple[str, dict[str, Any]]], path: Path) -> Path | None:
    """One :func:`draw_reliability` panel per ``(title, bins)``, side by side, saved as ``path``.

    Args:
        panels: ``(title, bins)`` per panel; bins as run.json's ``reliability`` (``confidence``, ``accuracy``,
            ``count``, optional ``split`` and ``before``), e.g. :func:`panel` of a configuration.
        path: the PNG.

    Returns:
        ``path``, or None without panels.
    """
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5.5), squeeze=False)
    for ax, (label, bins) in zip(axes[0], panels):
        draw_reliability(ax, label, bins)
    return save_plot(fig, path)


def draw_reliability(ax: Any, label: str, after: dict[str, Any]) -> None:
    """Accuracy per confidence bin, the diagonal, the gap shaded, ECE in the title; before → after when recorded.

    Args:
        ax: the matplotlib axis to draw into (its ticks are set here).
        label: the first title line.
        after: reliability bins (``count``, ``confidence``, ``accuracy``; optional ``split`` and ``before``).
    """
    before = after.get("before")
    n = len(after["count"])
    centres, width = (np.arange(n) + 0.5) / n, 1.0 / n
    title = f"{label}\nECE {ece(after):.4f}"
    if before and len(before["count"]) == n:  # outlines on top: visible whether above or below the bars
        shown = [i for i in range(n) if before["accuracy"][i] is not None]
        ax.bar(centres[shown], [before["accuracy"][i] for i in shown], width, fill=False, edgecolor="#ff7f0e",
               ls="--", lw=1.3, zorder=4, label=f"accuracy before scaling (ECE {ece(before):.4f})")
        title = f"{label}\nECE {ece(before):.4f} → {ece(after):.4f} (temperature scaling)"
    shown = [i for i in range(n) if after["accuracy"][i] is not None]
    acc = np.array([after["accuracy"][i] for i in shown])
    conf = np.array([after["confidence"][i] for i in shown])
    ax.bar(centres[shown], acc, width, color="#8fa8d4", edgecolor="black", lw=0.5, zorder=2, label="accuracy")
    # hatched only, on top: an over-confident gap stands above its bar, an under-confident one inside it
    ax.bar(centres[shown], conf - acc, width, bottom=acc, fill=False, hatch="//", edgecolor="#d62728", lw=0.8,
           zorder=3, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    one = _at_one(after)
    if one:  # torchmetrics' own slot: a diamond on the right edge
        ax.plot([1.0], [one[1]], "D", color="#d62728", ms=7, clip_on=False, zorder=5,
                label=f"confidence exactly 1 ({one[0]} images)")
    ticks = np.linspace(0, 1, 6)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel=plain(f"accuracy ({after.get('split') or '?'})"),
           title=plain(title))
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper left")


def imbalance_note(jobs: list[Job], metric: str, esc: Callable[[Any], str] = str) -> str | None:
    """The warning for a plain-accuracy ranking of imbalanced classes, or None.

    Args:
        jobs: the report's jobs (finished ones with ``data.class_counts.train`` count).
        metric: the ranking metric.
        esc: escapes each metric name (md_escape for Markdown).

    Returns:
        One sentence when ``metric`` is plain accuracy and some job's largest / smallest training class
        exceeds :data:`IMBALANCE_RATIO` (an empty class counts as infinitely smaller), naming the
        class-balanced metrics the jobs logged.
    """
    if metric not in PLAIN_ACCURACY:
        return None
    ratios = []
    for job in jobs:
        counts = list(((job.info.get("data") or {}).get("class_counts") or {}).get("train", {}).values())
        if job.status == Status.OK and len(counts) > 1:
            ratios.append(max(counts) / min(counts) if min(counts) > 0 else math.inf)
    worst = max(ratios, default=0.0)
    if worst <= IMBALANCE_RATIO:
        return None
    present = {m for j in jobs if j.status == Status.OK for m in j.metrics}
    better = [esc(m) for m in BALANCED if m in present]
    ratio = "∞" if math.isinf(worst) else f"{worst:.1f}"
    advice = (f"rank by --metric {' or '.join(better)}" if better
              else "log a class-balanced metric (f1_macro, acc_balanced) and rank by it")
    return (f"the training classes are imbalanced (largest / smallest = {ratio}:1): plain accuracy hides small "
            f"classes; {advice}")
