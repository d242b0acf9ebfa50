"""Configurations → summary.csv / summary.md / PNG plots / paired comparison / report.html."""

from __future__ import annotations

import base64
import csv
import html
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from visionsweep.report.collect import Configuration, Job, best_epoch, curve_metric  # noqa: E402
from visionsweep.report.cost import human  # noqa: E402
from visionsweep.report.stats import Paired, paired  # noqa: E402
from visionsweep.analysis.plots import save_plot  # noqa: E402
from visionsweep.utils.atomic import atomic_open  # noqa: E402
from visionsweep.utils.text import csv_cell, md_escape, plain  # noqa: E402
from visionsweep.runinfo import Status, higher_is_better  # noqa: E402

MEAN_COLOUR, CI_COLOUR = "#4C72B0", "#555555"  # means.png: each configuration's mean, its CI

EXTRA_METRICS = ("val/acc_best", "test/acc", "val/loss", "test/f1_macro", "test/acc_balanced", "val/miou", "test/miou",
                 "val/map_best", "test/map", "test/ece", "test/nll")


def summary_rows(configs: list[Configuration], metric: str) -> list[dict[str, Any]]:
    """One row per configuration, sorted best first by ``metric`` (mean over seeds)."""
    metrics = [metric] + [m for m in EXTRA_METRICS if m != metric and any(
        m in j.metrics for c in configs for j in c.ok)]
    rows = []
    for c in configs:
        row: dict[str, Any] = {"configuration": c.label, "arch": c.arch, "augmentation": c.augmentation,
                               unit(configs): len(c.values(metric)),
                               "failed": sum(j.status not in (Status.OK, Status.PRUNED) for j in c.jobs)}
        if any(j.status == Status.PRUNED for k in configs for j in k.jobs):
            row["pruned"] = sum(j.status == Status.PRUNED for j in c.jobs)
        for m in metrics:
            row[f"{m} mean"], row[f"{m} ci95"] = c.stat(m)
        epochs = [e for e in (best_epoch(j, metric) for j in c.ok) if e is not None]
        row["best epoch"] = float(np.mean(epochs)) if epochs else math.nan
        rows.append(row)  # the cost columns: cost.add_columns (they need every row, for the Pareto fronts)
    sign = 1 if higher_is_better(metric) else -1
    return sorted(rows, key=lambda r: -sign * r[f"{metric} mean"] if not math.isnan(r[f"{metric} mean"])
                  else math.inf)


def unit(configs: list[Configuration]) -> str:
    """``folds`` when the report pools k-fold jobs, else ``seeds``."""
    return "folds" if any(c.unit == "folds" for c in configs) else "seeds"


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write rows as CSV (numbers to 12 significant digits, so a mean reads 3320.4, not 3320.3999999999996;
    a label a spreadsheet would run as a formula gets a ``'``)."""
    def cell(v: Any) -> Any:
        if isinstance(v, bool):
            return str(v).lower()
        return float(f"{v:.12g}") if isinstance(v, float) else csv_cell(v)

    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["configuration"])
        writer.writeheader()
        writer.writerows({k: cell(v) for k, v in r.items()} for r in rows)
    return path


def fmt(mean: float, ci: float, digits: int = 4) -> str:
    """``0.9812 ± 0.0031`` (or just the mean when the CI is undefined)."""
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(ci) else f"{mean:.{digits}f} ± {ci:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells: ``<m> mean``/``<m> ci95`` pairs merged into ``mean ± CI``."""
    header, cells = [], [[] for _ in rows]
    for key in rows[0] if rows else []:
        if key.endswith(" ci95"):
            continue
        if key.endswith(" mean"):
            header.append(key[:-5] + " (mean ± 95% CI)")
            for cell, r in zip(cells, rows):
                cell.append(fmt(r[key], r[key[:-5] + " ci95"]))
        else:
            header.append(key)
            for cell, r in zip(cells, rows):
                v = r[key]
                shown = human(key, v)  # params as 11.7M, latency in ms to 2 decimals, flags as ✓
                cell.append(shown if shown is not None else f"{v:.1f}" if isinstance(v, float) and not math.isnan(v)
                            else "—" if isinstance(v, float) else str(v))
    return header, cells


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table; every header and cell escaped (:func:`md_escape`): override
    values, model names, paths and errors come from users."""
    lines = ["| " + " | ".join(md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)


def comparisons(configs: list[Configuration], metric: str) -> list[Paired]:
    """The best configuration against each other one, over the seeds they share."""
    ranked = [c for c in configs if c.values(metric)]
    if len(ranked) < 2:
        return []
    sign = 1 if higher_is_better(metric) else -1
    best = max(ranked, key=lambda c: sign * c.stat(metric)[0])
    return [paired(best.values(metric), c.values(metric), c.label, higher_is_better=higher_is_better(metric),
                   unit=unit(configs)) for c in ranked if c is not best]


def plot_curves(configs: list[Configuration], metric: str, path: Path) -> Path | None:
    """Per-epoch curve of each configuration: mean over seeds, min–max over seeds shaded."""
    key = curve_metric(metric)
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for c in configs:
        series = [dict(j.curves[key]) for j in c.ok if j.curves.get(key)]
        if not series:
            continue
        epochs = sorted(set().union(*series))
        grid = np.array([[s.get(e, np.nan) for e in epochs] for s in series])
        mean = np.nanmean(grid, axis=0)
        (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=plain(f"{c.label} (n={len(series)})"))
        if len(series) > 1:
            ax.fill_between(epochs, np.nanmin(grid, axis=0), np.nanmax(grid, axis=0), alpha=0.2,
                            color=line.get_color())
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel=plain(key),
           title=plain(f"{key} per epoch (mean over {unit(configs)}, shaded: their range)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_plot(fig, path)


def plot_means(configs: list[Configuration], metric: str, path: Path) -> Path | None:
    """Final metric per configuration, best first: the mean (diamond), its 95 % CI and each seed (dots).

    Points rather than bars: the axis zooms to where the values are (0.91..0.99, say), which would make bars
    that start at 0.91 look many times apart. The axis holds every CI whole; a CI (a t-interval from few
    seeds can pass 1, or 0) is drawn to its metric's bound: [0, 1] for a score, 0 for a loss.
    """
    sign = 1 if higher_is_better(metric) else -1
    ranked = sorted((c for c in configs if c.values(metric)), key=lambda c: -sign * c.stat(metric)[0])
    if not ranked:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ranked) + 2), 5))
    x = np.arange(len(ranked))
    means = np.array([c.stat(metric)[0] for c in ranked])
    half = np.array([0.0 if math.isnan(h) else h for _, h in (c.stat(metric) for c in ranked)])
    seeds = [list(c.values(metric).values()) for c in ranked]
    values = [v for vals in seeds for v in vals]
    # a score in [0, 1] (accuracy, IoU, F1) is never below 0 or above 1; a loss, NLL or ECE never below 0
    floor = 0.0 if min(values) >= 0 else -np.inf
    ceiling = 1.0 if higher_is_better(metric) and max(values) <= 1 else np.inf
    low, high = np.clip(means - half, floor, ceiling), np.clip(means + half, floor, ceiling)
    ax.errorbar(x, means, yerr=[means - low, high - means], fmt="none", ecolor=CI_COLOUR, elinewidth=1.5,
                capsize=6, capthick=1.5, zorder=2)
    ax.scatter(x, means, marker="D", s=70, color=MEAN_COLOUR, zorder=3)
    for i, vals in enumerate(seeds):
        ax.scatter(np.full(len(vals), i), vals, color="black", s=12, zorder=4)
    lo, hi = min(low.min(), min(values)), max(high.max(), max(values))
    pad = max((hi - lo) * 0.1, 0.005)
    ax.set_ylim(lo - pad, hi + pad)  # (a CI drawn to its bound keeps its cap clear of the frame)
    ax.set_xlim(-0.6, len(ranked) - 0.4)
    ax.set_xticks(x, [plain(c.label) for c in ranked], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=plain(metric), title=plain(f"{metric}: mean ± 95% CI over {unit(configs)} (dots: {unit(configs)})"))
    ax.grid(axis="y", alpha=0.3)
    return save_plot(fig, path)


def plot_heatmap(configs: list[Configuration], metric: str, path: Path) -> Path | None:
    """Mean metric on an architecture × augmentation grid (only when both vary)."""
    archs = sorted({c.arch for c in configs})
    augs = sorted({c.augmentation for c in configs})
    if len(archs) < 2 and len(augs) < 2:
        return None
    grid = np.full((len(archs), len(augs)), np.nan)
    for c in configs:
        vals = list(c.values(metric).values())
        if vals:
            grid[archs.index(c.arch), augs.index(c.augmentation)] = np.mean(vals)
    fig, ax = plt.subplots(figsize=(1.6 * len(augs) + 3, 0.8 * len(archs) + 2))
    im = ax.imshow(grid, cmap="viridis" if higher_is_better(metric) else "viridis_r", aspect="auto")
    for i in range(len(archs)):
        for j in range(len(augs)):
            if not np.isnan(grid[i, j]):
                bright = im.norm(grid[i, j]) > 0.6 if higher_is_better(metric) else im.norm(grid[i, j]) < 0.4
                ax.text(j, i, f"{grid[i, j]:.4f}", ha="center", va="center", fontsize=9,
                        color="black" if bright else "white")
    ax.set_xticks(range(len(augs)), [plain(a) for a in augs])
    ax.set_yticks(range(len(archs)), [plain(a) for a in archs])
    ax.set(xlabel="augmentation", ylabel="architecture", title=plain(f"{metric} (mean over {unit(configs)})"))
    fig.colorbar(im, ax=ax)
    return save_plot(fig, path)



def failed_jobs(jobs: list[Job]) -> list[Job]:
    """Jobs that did not finish, in job order (a pruned Optuna trial was stopped on purpose: not here)."""
    return [j for j in jobs if j.status not in (Status.OK, Status.PRUNED)]


def html_page(title: str, sections: list[tuple[str, str]], images: list[Path]) -> str:
    """A self-contained HTML page: Markdown-ish sections as <pre>/<table>, PNGs embedded as data URIs."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, content in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>{content}")
    for img in images:
        data = base64.b64encode(img.read_bytes()).decode()
        body.append(f'<figure><img alt="{html.escape(img.stem, quote=True)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(img.name)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}.bad{color:#b00}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def html_table(header: list[str], cells: list[list[str]], table_id: str = "") -> str:
    """An HTML table (header, cells and id escaped: override values and errors come from users)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in cells)
    return (f"<table id=\"{html.escape(table_id, quote=True)}\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def html_paragraph(markdown_text: str) -> str:
    """``<p>`` of a one-line Markdown text: ``**`` dropped, everything else escaped."""
    return f"<p>{html.escape(markdown_text.replace('**', ''))}</p>"


def paired_table(results: list[Paired], best_label: str) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the paired comparison."""
    shared = f"shared {results[0].unit}" if results else "shared seeds"
    header = [f"{best_label} vs", shared, "mean difference ± 95% CI", "wins", "p (paired t)", "verdict"]
    cells = [[r.other, str(len(r.seeds)), fmt(r.mean, r.ci), f"{r.wins}/{len(r.seeds)}",
              "—" if math.isnan(r.p_value) else f"{r.p_value:.3g}", r.verdict] for r in results]
    return header, cells
