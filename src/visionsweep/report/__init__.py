"""The comparison report of sweeps: ``python -m visionsweep.report <sweep dir> [...]``.

collect.py reads run dirs, stats.py computes mean ± CI and paired differences over seeds,
render.py writes tables and PNGs, cost.py adds cost columns, Pareto fronts and time to target,
calibration.py temperature scaling, reliability diagrams and the imbalance warning, study.py the Optuna
study; :func:`build_report` ties them.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

from visionsweep.errors import ConfigError
from visionsweep.report import calibration, collect, cost, render, study
from visionsweep.utils.atomic import atomic_write, json_default
from visionsweep.utils.text import md_escape
from visionsweep.runinfo import Status, higher_is_better

log = logging.getLogger(__name__)


def build_report(paths: list[str | Path], out_dir: str | Path | None = None, metric: str | None = None,
                 title: str | None = None, reliability: str | None = None) -> dict[str, Any]:
    """Collect every job under ``paths`` and write the report into ``out_dir``.

    Args:
        paths: sweep dirs and/or run dirs.
        out_dir: where to write; default the single path given (a sweep dir).
        metric: metric to rank by; default the first of ``collect.METRIC_PREFERENCE`` found.
        title: page title.
        reliability: label of the configuration shown beside the best one in reliability.png (default:
            the one with the highest test/ece).

    Returns:
        ``{"rows", "metric", "failed", "files", "paired", "time_to_target", ...}`` describing what was written.

    Raises:
        ConfigError: nothing to report, an unknown ``metric`` or ``reliability`` label.
    """
    roots = [Path(p).expanduser() for p in paths]
    if not roots:
        raise ConfigError("report: give at least one sweep dir")
    out = Path(out_dir).expanduser() if out_dir else roots[0]
    left_out: list[str] = []  # damaged run dirs: a warning each, and listed in the report
    jobs = collect.load_jobs(collect.find_job_dirs(roots), left_out)
    if not jobs:
        raise ConfigError(f"report: no run dirs (run.json or .hydra/) under {', '.join(map(str, roots))}")
    out.mkdir(parents=True, exist_ok=True)
    metric = collect.choose_metric([j for j in jobs if j.status == Status.OK] or jobs, metric)
    configs = collect.group_configurations(jobs)
    rows = render.summary_rows(configs, metric)
    target = cost.time_to_target(jobs, metric)
    cost.add_columns(rows, configs, metric, target)
    calibration.add_columns(rows, configs)
    panels = calibration.pick(configs, [r["configuration"] for r in rows], reliability)
    imbalance = calibration.imbalance_note(jobs, metric)
    if imbalance:
        log.warning("%s", imbalance)
    files = [render.write_csv(rows, out / "summary.csv")]
    header, cells = render.table(rows)
    pairs = render.comparisons(configs, metric)
    best = rows[0]["configuration"] if rows else ""
    p_header, p_cells = render.paired_table(pairs, best)
    failed = render.failed_jobs(jobs)

    def notes(esc: Any) -> list[str]:  # Pareto fronts, time to target, temperature scaling, reliability panels
        lines = [*cost.front_lines(rows, metric, esc), cost.target_sentence(target, esc),
                 calibration.temperature_sentence(configs, esc), calibration.describe_pick(panels, esc)]
        return [line for line in lines if line] or ["no job recorded its cost, epoch times or calibration."]

    images = [p for p in (render.plot_curves(configs, metric, out / "curves.png"),
                          render.plot_means(configs, metric, out / "means.png"),
                          render.plot_heatmap(configs, metric, out / "heatmap.png"),
                          *(cost.plot_pareto(rows, metric, flag, out / png) for flag, (_, png) in cost.FRONTS.items()),
                          cost.plot_time_to_target(configs, target, out / "time_to_target.png"),
                          calibration.plot_reliability(list(map(calibration.panel, panels)), out / "reliability.png"))
              if p]
    studies = [study.study_report(db, out) for db in study.find_studies(roots)]
    images += [img for s in studies for img in s["images"]]

    n_pruned = sum(j.status == Status.PRUNED for j in jobs)
    n_ok = len(jobs) - len(failed) - n_pruned
    pruned = f", {n_pruned} pruned" if n_pruned else ""
    intro = (f"{len(jobs)} jobs ({n_ok} ok, {len(failed)} failed{pruned}) in {len(configs)} configurations; "
             f"ranked by **{{metric}}** ({'higher' if higher_is_better(metric) else 'lower'} is "
             f"better), mean ± 95% CI (Student t) over {render.unit(configs)}.")
    # Markdown: every user string (title, metric, labels, errors, study names) through md_escape
    md = [f"# {md_escape(title or 'visionsweep report')}", "", intro.format(metric=md_escape(metric)), "",
          *([calibration.imbalance_note(jobs, metric, md_escape), ""] if imbalance else []),
          "## Summary", "", render.markdown_table(header, cells)]
    md += ["", "## Cost, time to target and calibration", ""] + [f"- {n}" for n in notes(md_escape)]
    if pairs:
        md += ["", f"## Paired comparison: {md_escape(best)} against each other configuration "
                   f"(same {render.unit(configs)})", "", render.markdown_table(p_header, p_cells)]
    f_header = ["job", "configuration", "seed", "error type", "error"]
    f_cells = [[str(j.path), j.label, str(j.seed), j.error_type or "", (j.error or j.status)[:300]] for j in failed]
    if failed:
        md += ["", "## Failed jobs", "", render.markdown_table(f_header, f_cells)]
    if left_out:
        md += ["", "## Left out (damaged)", ""] + [f"- {md_escape(p)}" for p in left_out]
    for s in studies:
        md += ["", "## Optuna", ""] + [study.describe(_md_study(e)) for e in s["studies"]]
    md += ["", "## Pictures", ""] + [f"![{md_escape(p.stem)}]({quote(p.name)})" for p in images]
    files.append(_write(out / "summary.md", "\n".join(md) + "\n"))

    # every string below may come from a user (metric, overrides, study names, errors): escaped
    summary = "".join(render.html_paragraph(t) for t in (intro.format(metric=metric), imbalance) if t)
    sections = [("Summary", summary + render.html_table(header, cells, "summary")),
                ("Cost, time to target and calibration", "".join(f"<p>{html.escape(n)}</p>" for n in notes(str)))]
    if pairs:
        sections.append((f"Paired comparison: {best} vs each other configuration",
                         render.html_table(p_header, p_cells, "paired")))
    if failed:
        sections.append(("Failed jobs", render.html_table(f_header, f_cells, "failed")))
    if left_out:
        sections.append(("Left out (damaged)", "".join(render.html_paragraph(p) for p in left_out)))
    for s in studies:
        sections += [("Optuna", "".join(render.html_paragraph(study.describe(e)) for e in s["studies"]))]
    files.append(_write(out / "report.html", render.html_page(title or "visionsweep report", sections, images)))
    result = {"metric": metric, "rows": rows, "failed": [str(j.path) for j in failed], "pruned": n_pruned, "left_out": left_out,
              "paired": [p.__dict__ for p in pairs], "studies": [e for s in studies for e in s["studies"]],
              "time_to_target": {k: target[k] for k in ("metric", "target", "fraction")} if target else None,
              "imbalance": imbalance, "reliability": [c.label for c in panels],
              "files": [str(f) for f in files + images]}
    _write(out / "report.json", json.dumps(result, indent=2, default=json_default))
    return result


def _md_study(entry: dict[str, Any]) -> dict[str, Any]:
    """A study entry with its user strings (name, parameter names and values) escaped for Markdown."""
    safe = {**entry, "study": md_escape(entry["study"]), "direction": md_escape(entry["direction"])}
    if "best_params" in entry:
        safe["best_params"] = {md_escape(k): md_escape(study._short(v)) for k, v in entry["best_params"].items()}
    if entry.get("importance"):
        safe["importance"] = {md_escape(k): v for k, v in entry["importance"].items()}
        safe["importance_evaluator"] = md_escape(entry.get("importance_evaluator", study.EVALUATOR))
    return safe


def _write(path: Path, text: str) -> Path:
    atomic_write(path, text)
    return path


