"""The Optuna part of a report: best trial, parameter importance, optimisation history."""

from __future__ import annotations

import hashlib
import logging
import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger(__name__)


def find_studies(paths: list[Path]) -> list[Path]:
    """``optuna.db`` files written by the visionsweep_optuna sweeper under ``paths``."""
    return sorted({p for root in paths for p in Path(root).rglob("optuna.db")})


def study_report(db: Path, out_dir: Path) -> dict[str, Any]:
    """Summarise every study in ``db`` and plot history and importances into ``out_dir``.

    Args:
        db: sqlite file of the study.
        out_dir: where the PNGs go.

    Returns:
        ``{"studies": [...], "images": [paths]}`` with best trial, its params and importances.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{db.resolve()}"
    result: dict[str, Any] = {"studies": [], "images": []}
    for summary in optuna.get_all_study_summaries(storage=storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.trials
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        entry: dict[str, Any] = {
            "study": study.study_name, "storage": storage, "direction": study.direction.name.lower(),
            "trials": len(trials), "complete": len(done),
            "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
        }
        if done:
            best = study.best_trial
            entry.update(best_trial=best.number, best_value=best.value, best_params=best.params)
            entry["importance"] = _importance(study) if len(done) >= 3 else {}
            stem = safe_stem(study.study_name)
            result["images"].append(_plot_history(study, done, out_dir / f"optuna_history_{stem}.png"))
            if entry["importance"]:
                result["images"].append(_plot_importance(entry["importance"], study.study_name,
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


def _importance(study: Any) -> dict[str, float]:
    import optuna

    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except Exception as e:  # too few distinct values, a single parameter, ...
        log.info("parameter importance unavailable: %s", e)
        return {}


def _plot_history(study: Any, done: list, path: Path) -> Path:
    values = np.array([t.value for t in done])
    numbers = [t.number for t in done]
    best = np.maximum.accumulate(values) if study.direction.name == "MAXIMIZE" else np.minimum.accumulate(values)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(numbers, values, s=18, label="trial")
    ax.step(numbers, best, where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel="objective", title=_plain(f"Optuna study {study.study_name}: history"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_importance(importance: dict[str, float], name: str, path: Path) -> Path:
    keys = sorted(importance, key=importance.get)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(keys) + 1.5))
    ax.barh([_plain(k) for k in keys], [importance[k] for k in keys], color="C2")
    ax.set(xlabel="importance (fANOVA)", title=_plain(f"Optuna study {name}: parameter importance"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def describe(entry: dict[str, Any]) -> str:
    """One Markdown paragraph for a study."""
    text = (f"**{entry['study']}** ({entry['direction']}): {entry['complete']} of {entry['trials']} trials "
            f"complete, {entry['failed']} failed")
    if "best_value" in entry:
        params = ", ".join(f"{k}={_short(v)}" for k, v in entry["best_params"].items())
        text += f"; best trial {entry['best_trial']}: {entry['best_value']:.4f} with {params}"
    if entry.get("importance"):
        text += "; importance: " + ", ".join(f"{k} {v:.2f}" for k, v in entry["importance"].items())
    return text + "."


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) and math.isfinite(value) else str(value)
