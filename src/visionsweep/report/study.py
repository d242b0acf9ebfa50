"""The Optuna part of a report: best trial, parameter importance, optimisation history.

The plots are Optuna's own (``optuna.visualization.matplotlib``), retitled and saved as PNG; the
importance is PED-ANOVA's (``optuna.importance.PedAnovaImportanceEvaluator``, passed explicitly).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: Optuna's matplotlib plots draw on whatever backend is active
import matplotlib.pyplot as plt  # noqa: E402

from visionsweep.utils.atomic import save_figure  # noqa: E402

log = logging.getLogger(__name__)
EVALUATOR = "PED-ANOVA"  # optuna.importance.PedAnovaImportanceEvaluator, see _evaluator()


def find_studies(paths: list[Path]) -> list[Path]:
    """``optuna.db`` files written by the visionsweep_optuna sweeper under ``paths``."""
    return sorted({p for root in paths for p in Path(root).rglob("optuna.db") if p.is_file()})


def db_problem(db: Path) -> str | None:
    """What makes ``db`` unreadable as an Optuna study (None when it reads), naming the file.

    Checked read-only with sqlite itself first: Optuna would add its tables to an empty or foreign file.
    """
    try:
        with db.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"{db} cannot be read ({e.strerror or e})"
    if head != b"SQLite format 3\x00":
        return f"{db} is not an SQLite database"
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
            check = con.execute("PRAGMA quick_check").fetchone()[0]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as e:
        return f"{db} is a damaged SQLite database ({e})"
    if check != "ok":
        return f"{db} is a damaged SQLite database ({check})"
    if not {"studies", "trials"} <= tables:
        return f"{db} holds no Optuna study tables"
    return None


def study_report(db: Path, out_dir: Path) -> dict[str, Any]:
    """Summarise every study in ``db`` and plot history and importances into ``out_dir``.

    Args:
        db: sqlite file of the study.
        out_dir: where the PNGs go.

    Returns:
        ``{"studies": [...], "images": [paths]}`` with best trial, its params and importances.
    """
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    result: dict[str, Any] = {"studies": [], "images": []}
    problem = db_problem(db)
    if problem:
        log.warning("%s: left out of the report", problem)
        return result
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{db.resolve()}"
    try:
        studies = [optuna.load_study(study_name=s.study_name, storage=storage)
                   for s in optuna.get_all_study_summaries(storage=storage)]
        loaded = [(study, study.trials) for study in studies]
    except (SQLAlchemyError, optuna.exceptions.OptunaError, RuntimeError, ValueError, KeyError) as e:
        log.warning("%s cannot be read by Optuna (%s: %s): left out of the report", db, type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "")
        return result
    for study, trials in loaded:
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        entry: dict[str, Any] = {
            "study": study.study_name, "storage": storage, "direction": study.direction.name.lower(),
            "trials": len(trials), "complete": len(done),
            "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
        }
        if done:
            best = study.best_trial
            entry.update(best_trial=best.number, best_value=best.value, best_params=best.params)
            evaluator = _evaluator()
            entry["importance"] = _importance(study, evaluator) if len(done) >= 3 else {}
            entry["importance_evaluator"] = EVALUATOR
            stem = safe_stem(study.study_name)
            result["images"].append(_plot_history(study, out_dir / f"optuna_history_{stem}.png"))
            if entry["importance"]:
                result["images"].append(_plot_importance(study, evaluator, len(entry["importance"]),
                                                         out_dir / f"optuna_importance_{stem}.png"))
        result["studies"].append(entry)
    return result


def safe_stem(name: str) -> str:
    """A file-name-safe form of a study name (``/``, ``..``, markup and spaces replaced).

    A changed name gets a short hash of the original, so two studies never share a file.

    Args:
        name: The Optuna study name (user-chosen).

    Returns:
        Letters, digits, ``-``, ``_`` and ``.`` only, at most ~70 characters, never empty.
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:60]
    if stem != name or not stem:
        stem = f"{stem or 'study'}_{hashlib.sha1(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return stem


def _plain(text: str) -> str:
    return str(text).replace("$", r"\$")  # a study name never switches on matplotlib's mathtext


def _evaluator() -> Any:
    """PED-ANOVA, computed once per study: the importance table and its plot share the result."""
    # named explicitly (it is Optuna 4+'s default too), so the label on the plot says what was computed
    from optuna.importance import BaseImportanceEvaluator, PedAnovaImportanceEvaluator

    class Once(BaseImportanceEvaluator):
        def __init__(self) -> None:
            self.inner, self.done = PedAnovaImportanceEvaluator(), {}

        def evaluate(self, study: Any, params: Any = None, *, target: Any = None) -> dict[str, float]:
            key = (study.study_name, tuple(params or ()), target)
            if key not in self.done:
                self.done[key] = self.inner.evaluate(study, params=params, target=target)
            return self.done[key]

    return Once()


def _importance(study: Any, evaluator: Any) -> dict[str, float]:
    import optuna

    try:
        return {k: float(v) for k, v in
                optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
    except Exception as e:  # too few distinct values, a single parameter, ...
        log.info("parameter importance unavailable: %s", e)
        return {}


def _save(ax: Any, title: str, size: tuple[float, float], path: Path) -> Path:
    """Retitle an Optuna matplotlib plot (names escaped), save it as PNG and close it."""
    for loc in ("left", "right"):  # Optuna puts some titles on the left
        ax.set_title("", loc=loc)
    ax.set_title(_plain(title))
    ax.figure.set_size_inches(*size)
    save_figure(ax.figure, path, dpi=110, bbox_inches="tight")  # the history's legend sits outside the axes
    plt.close(ax.figure)
    return path


def _plot_history(study: Any, path: Path) -> Path:
    from optuna.visualization.matplotlib import plot_optimization_history

    with _quiet():
        ax = plot_optimization_history(study)  # complete trials and the best value so far
        return _save(ax, f"Optuna study {study.study_name}: history", (7, 4), path)


def _plot_importance(study: Any, evaluator: Any, n_params: int, path: Path) -> Path:
    from optuna.visualization.matplotlib import plot_param_importances

    with _quiet():
        ax = plot_param_importances(study, evaluator=evaluator)
        ax.set_yticks(ax.get_yticks(), [_plain(t.get_text()) for t in ax.get_yticklabels()])
        ax.set_xlabel(f"importance ({EVALUATOR})")
        return _save(ax, f"Optuna study {study.study_name}: parameter importance", (7, 0.5 * n_params + 1.5),
                     path)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning for its matplotlib plots (unchanged since Optuna 2.2), and keep
    their ``plt.style.use("ggplot")`` to them: without the rc_context it restyles every later plot of the
    process (the report's curves lost matplotlib's default colours)."""
    import matplotlib
    import optuna

    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def describe(entry: dict[str, Any]) -> str:
    """One Markdown paragraph for a study."""
    text = (f"**{entry['study']}** ({entry['direction']}): {entry['complete']} of {entry['trials']} trials "
            f"complete, {entry['failed']} failed")
    if "best_value" in entry:
        params = ", ".join(f"{k}={_short(v)}" for k, v in entry["best_params"].items())
        text += f"; best trial {entry['best_trial']}: {entry['best_value']:.4f} with {params}"
    if entry.get("importance"):
        evaluator = entry.get("importance_evaluator", EVALUATOR)
        text += f"; importance ({evaluator}): " + ", ".join(f"{k} {v:.2f}" for k, v in entry["importance"].items())
    return text + "."


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) and math.isfinite(value) else str(value)
