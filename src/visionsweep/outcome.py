"""How a training job ends: its metrics, its status, the summary line, and what a failure leaves."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionsweep.errors import DiskFullError, exception_chain
from visionsweep.runinfo import Status
from visionsweep.utils.atomic import disk_full_cause

if TYPE_CHECKING:
    import pytorch_lightning as pl

SUMMARY_KEYS = ("val/acc_best", "val/acc", "test/acc", "val/miou_best", "val/miou", "test/miou", "val/map_best", "test/map",
                "test/f1_macro")


def scalars(metrics: dict) -> dict[str, float]:
    """Lightning's callback metrics as plain rounded floats (one-element tensors only)."""
    return {k: round(float(v), 6) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def status(trainer: pl.Trainer) -> Status:
    """``pruned`` when an Optuna pruner stopped the job (callbacks/optuna_pruning.py), else ``ok``."""
    from visionsweep.callbacks.optuna_pruning import OptunaPruning

    pruned = any(isinstance(cb, OptunaPruning) and cb.pruned_at is not None for cb in trainer.callbacks)
    return Status.PRUNED if pruned else Status.OK


def failure(e: BaseException) -> dict[str, str]:
    """What a failed job's run.json records: ``error_type`` and a one-line ``error``.

    A user error (ours, also when Hydra or a DataLoader worker wrapped it) is recorded as its message,
    anything else as ``<Type>: <message>``, the line the terminal or the job's log shows (a bug's
    traceback stays in the log).

    Args:
        e: What the job raised.

    Returns:
        ``{"error_type": "ConfigError", "error": "data.root '/x' does not exist: ..."}``.
    """
    from visionsweep.utils.cli import user_error

    err = user_error(e) if isinstance(e, Exception) else None
    text = str(err) if err is not None else f"{type(e).__name__}: {e}"
    return {"error_type": type(err or e).__name__, "error": " ".join(text.split())}


def disk_full(e: BaseException, out: Path) -> DiskFullError | None:
    """``e`` as a DiskFullError naming the file (ENOSPC anywhere in its chain), else None."""
    known = next((x for x in exception_chain(e) if isinstance(x, DiskFullError)), None)
    if known is not None:
        return known
    cause = disk_full_cause(e)
    if cause is None:
        return None
    full = DiskFullError(cause.filename or f"into {out}")
    full.__cause__ = e
    return full


def remove_if_only_hydra_files(out: Path) -> bool:
    """A command that failed on a bad input before doing anything leaves no run dir (returns True if removed).

    Only a dir holding nothing but Hydra's ``.hydra/`` and the command's ``<task>.log`` goes, and then the
    default layout's ``runs/<task>/`` above it if that is left empty (a parent of any other name is kept).
    """
    if out.is_dir() and all(p.name == ".hydra" or (p.suffix == ".log" and p.is_file()) for p in out.iterdir()):
        tasks = {p.stem for p in out.glob("*.log")}
        shutil.rmtree(out, ignore_errors=True)
        if out.parent.name in tasks:
            with contextlib.suppress(OSError):  # not empty (other runs): kept
                out.parent.rmdir()
        return True
    return False


def interrupted(e: BaseException) -> str | None:
    """How ``e`` stopped the run from outside: ``Ctrl-C`` (a KeyboardInterrupt, or Lightning's ``sys.exit(1)``
    after one), ``SIGTERM`` (Lightning's SIGTERMException: a scheduler preempting the job), else None."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    chain = list(exception_chain(e))
    if any(isinstance(x, KeyboardInterrupt) for x in chain):
        return "Ctrl-C"
    return "SIGTERM" if any(isinstance(x, SIGTERMException) for x in chain) else None


def record_interrupt(record: Any, trainer: pl.Trainer | None, out: Path, how: str = "Ctrl-C") -> None:
    """Record a run stopped from outside (``how``: Ctrl-C, SIGTERM) as ``interrupted`` and print the one
    line that resumes it.

    run.json keeps the metrics of the last finished epoch and the checkpoint to resume from
    (``last.ckpt``, written at epoch ends: see callbacks/checkpoint.py's ``last_every_s``).

    Args:
        record: The run's RunRecord (None when it was interrupted before run.json was written).
        trainer: The run's trainer, None before it was built.
        out: The run dir.
        how: What stopped it (:func:`interrupted`).
    """
    finished = int(trainer.current_epoch) if trainer is not None else 0
    metrics = {k: v for k, v in scalars(trainer.callback_metrics).items() if not k.endswith("_step")} \
        if trainer is not None else {}
    last = out / "checkpoints" / "last.ckpt"
    resume = last if last.is_file() else None
    if record is not None:
        error = ("KeyboardInterrupt: stopped by the user (Ctrl-C)" if how == "Ctrl-C"
                 else "SIGTERMException: stopped by a SIGTERM (preempted or cancelled)")
        record.finish(Status.INTERRUPTED, error=error, error_type=error.split(":")[0], metrics=metrics or None,
                      epochs=finished, resume_checkpoint=str(resume) if resume else None)
    then = (f"resume with: python -m visionsweep.train ckpt_path={resume}" if resume
            else "no checkpoint was written yet: start it again")
    print(f"\ninterrupted after {finished} finished epoch(s) ({how}): {then}  → {out}", file=sys.stderr, flush=True)


def print_summary(metrics: dict[str, Any], seconds: float, out: Path, state: Status = Status.OK,
                  baselines: dict[str, Any] | None = None) -> None:
    """The one line a user reads at the end: the main metrics, the time, the run dir (multi-label: and the
    image-blind baselines of :func:`visionsweep.models.multilabel.baselines` before it)."""
    if baselines:
        floor = "; ".join(f"{name.replace('_', '-')} mAP {b['map']:.4f} F1 {b['f1_macro']:.4f}"
                          for name, b in baselines.items() if isinstance(b, dict))
        print(f"\nbaselines on {baselines.get('split')} (image-blind; the model must beat them): {floor}", flush=True)
    shown = "  ".join(f"{k}={metrics[k]:.4f}" for k in SUMMARY_KEYS if k in metrics)
    note = "  (pruned)" if state == Status.PRUNED else ""
    print(f"\n{shown}  ({seconds:.0f} s){note}  → {out}", flush=True)
