"""run.json: what a run was (git commit, versions, device, data fingerprint, overrides) and what it gave;
how a training job ends (its metrics, its status, the summary line, and what a failure leaves)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionsweep.errors import DiskFullError, exception_chain
from visionsweep.utils.atomic import atomic_write, disk_full_cause, intact_rows, json_default, remove_tmp_files

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger("visionsweep.runinfo")


class Status(str, Enum):
    """A run's ``status`` in run.json; :meth:`RunRecord.finish` is the one place that ends a run with one.

    ``interrupted``: stopped from outside (Ctrl-C, SIGTERM) with its last.ckpt kept for a resume, which
    is what the sweep ledger resumes (with ``running``: the process died without a word).
    """

    RUNNING = "running"
    OK = "ok"
    PRUNED = "pruned"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:
        return self.value


STATUSES = tuple(s.value for s in Status)
PACKAGES = ("torch", "torchvision", "pytorch-lightning", "timm", "torchmetrics", "albumentations",
            "hydra-core", "omegaconf", "numpy", "opencv-python-headless", "wandb")


def git_state(cwd: str | Path | None = None) -> dict[str, Any]:
    """Commit sha and dirty flag of the git work tree at ``cwd`` (None values outside git)."""
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"commit": sha, "dirty": bool(status) if status is not None else None}


def versions() -> dict[str, str | None]:
    """Installed versions of the stack (and Python)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict[str, Any]:
    """CPU/GPU the run used."""
    import torch  # (a run has imported it already; run.json readers need not)

    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


class RunRecord:
    """The run.json of one run dir, rewritten atomically whenever it changes; ``status: running`` until
    :meth:`finish` (or :meth:`fail`) ends it.

    Args:
        run_dir: the run's output dir.
        **fields: initial content (not ``status``).
    """

    def __init__(self, run_dir: str | Path, **fields: Any) -> None:
        _no_status(fields)
        self.path = Path(run_dir) / "run.json"
        self.data: dict[str, Any] = {
            "status": Status.RUNNING, "argv": sys.argv, "git": git_state(Path.cwd()),
            "versions": versions(), "device": device_info(), **fields,
        }
        self.save()

    @classmethod
    def unsaved(cls, run_dir: str | Path, **fields: Any) -> RunRecord:
        """A record not written yet (e.g. to :meth:`fail` on a disk too full for the usual first write)."""
        record = cls.__new__(cls)
        record.path = Path(run_dir) / "run.json"
        record.data = {"argv": sys.argv, **fields, "status": Status.RUNNING}
        return record

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` (not ``status``: :meth:`finish`) in and save."""
        _no_status(fields)
        self.data.update(fields)
        self.save()

    def finish(self, status: Status, **fields: Any) -> None:
        """End the run: ``status``, ``finished`` (unix time) and ``fields`` merged in, then saved."""
        self.data.update(fields, status=Status(status), finished=round(time.time(), 3))
        self.save()

    def save(self) -> None:
        """Write run.json (temp file + rename: never half-written).

        Raises:
            DiskFullError: No space left (run.json keeps its previous content; no temp file is left).
        """
        self._write(self.data)

    def _write(self, data: dict[str, Any]) -> None:
        atomic_write(self.path, json.dumps(data, indent=2, default=json_default))

    def fail(self, error: str, error_type: str | None = None) -> None:
        """Record ``status: failed`` with ``error`` (one line) and ``error_type``, even on a full disk.

        :func:`visionsweep.runinfo.failure` gives both for an exception; reports read them from here.

        There, our own partial ``*.tmp`` files under the run dir are removed first (they hold the space
        the failed write took), then the full record is tried, then a minimal one; if even that cannot
        be written the failure is only logged, since run.json is never written in place.
        """
        try:
            return self.finish(Status.FAILED, error=error, error_type=error_type)
        except DiskFullError:
            remove_tmp_files(self.path.parent)
        minimal = ("status", "error", "error_type", "task", "argv", "overrides", "started", "finished", "gpu")
        for data in (self.data, {k: self.data.get(k) for k in minimal}):
            try:
                return self._write(data)
            except DiskFullError:
                continue
        log.error("could not record the failure in %s: no space left", self.path)
        return None


def _no_status(fields: dict[str, Any]) -> None:
    if "status" in fields:
        raise TypeError("a run's status is set by RunRecord.finish / fail only")


def load(run_dir: str | Path) -> dict[str, Any]:
    """Read a run dir's run.json: {} if there is none, or if it is damaged (with a warning naming it)."""
    from visionsweep.ledger import read_json_object

    data, problem = read_json_object(Path(run_dir) / "run.json")
    if problem:
        log.warning("%s: ignored it", problem)
    return data or {}


def images_per_s(metrics: dict[str, float], trainer: Any, dm: Any, epochs: int, fit_s: float) -> float:
    """Training images/s of the whole job: the throughput callback's step-inclusive rate, else batches
    seen / fit time.

    Under DDP both count every rank's images: ``perf/img_s`` is rank 0's rate (its shard, its time; the ranks
    step in lockstep) times the world size, and ``dm.batch_size`` is already the global batch.
    """
    world = max(1, int(getattr(trainer, "world_size", 1) or 1))
    if metrics.get("perf/img_s"):
        return round(metrics["perf/img_s"] * world, 1)
    seen = min(trainer.num_training_batches * dm.batch_size, len(dm.train_samples)) * max(epochs, 1)
    return round(seen / fit_s, 1)


def read_json(path: Path) -> Any:
    """A JSON object file's content (perf.json): None when it does not exist or is damaged (with a warning)."""
    from visionsweep.ledger import read_json_object

    data, problem = read_json_object(Path(path))
    if problem:
        log.warning("%s: left out of run.json", problem)
    return data


def reliability(bins: dict[str, Any] | None, calibration: dict[str, Any] | None, has_test: bool
                ) -> dict[str, Any] | None:
    """run.json's ``reliability``: the test pass's bins (the final model's, temperature included), with the
    bins before temperature scaling under ``before`` when it ran."""
    if not bins:
        return None
    out = {"split": "test" if has_test else "val", **bins}
    if calibration and calibration.get("bins_before"):
        out["before"] = calibration["bins_before"]
    return out


def measure_cost(cfg: Any, model: Any, trainer: Any, fit_s: float, train_img_s: float | None) -> dict[str, Any] | None:
    """Time and size the trained model (``cfg.cost``), log the figures as ``cost/*`` to every logger.

    A failed measurement is a warning (the run's results stand), not a failed run.
    """
    from visionsweep import cost

    opts = cfg.get("cost") or {}
    size = int(model.hparams.get("image_size") or 224)
    try:
        record = cost.job_cost(model, size, trainer.strategy.root_device, fit_s, train_img_s,
                               devices=max(1, int(getattr(trainer, "num_devices", 1) or 1)),
                               batch=int(opts.get("batch") or 32), calls=int(opts.get("calls") or 30),
                               budget_s=float(opts.get("budget_s") or 10.0), onnx=bool(opts.get("onnx")),
                               opset=int(opts.get("opset") or 18))
    except Exception as e:  # noqa: BLE001 - e.g. an op the FLOP counter or the ONNX exporter cannot take
        log.warning("cost measurement failed (%s: %s): run.json has no cost", type(e).__name__, str(e).split("\n")[0])
        return None
    for logger in trainer.loggers:
        logger.log_metrics(cost.loggable(record), step=trainer.global_step)
        logger.save()
    log.info("cost: %.2fM params, %.3fG MACs at %d px; latency %.2f ms (batch 1, %s), %s img/s at batch %d",
             record["params"] / 1e6, record["macs"] / 1e9, size, record["latency_ms"], record["device"],
             record["throughput_img_s"], record["throughput_batch"])
    return record


def read_curves(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch series of every ``val/*`` and ``train/*`` metric in a Lightning metrics.csv.

    Damaged rows (cut off, wrong column count, a cell that is not a number) are left out; a file damaged
    throughout gives no curves. Either way one warning names the file and what was left out.
    """
    try:
        raw = metrics_csv.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("%s cannot be read (%s): left out the job's curves", metrics_csv, e.strerror or e)
        return {}
    rows, _, problem = intact_rows(raw, metrics_csv, "left out the job's curves")
    if problem:
        log.warning("%s", problem)
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if not row["epoch"]:  # learning-rate rows have no epoch
            continue
        for key, value in row.items():
            if key.startswith(("val/", "train/")) and value != "":
                curves[key][int(float(row["epoch"]))] = float(value)
    return {k: sorted(v.items()) for k, v in curves.items()}


LOWER_IS_BETTER = re.compile(r"loss|error|err$|(^|/)(ece|nll|brier)(_|$)")


def higher_is_better(metric: str) -> bool:
    """Losses and errors go down; everything else (acc, iou, f1) goes up."""
    return not LOWER_IS_BETTER.search(metric)


def best_point(series: list[tuple[int, float]], metric: str) -> tuple[int, float] | None:
    """The ``(epoch, value)`` of ``series`` (a curve of ``metric``) where it was best; NaNs never are."""
    finite = [(e, v) for e, v in series if math.isfinite(v)]
    return (max if higher_is_better(metric) else min)(finite, key=lambda ev: ev[1]) if finite else None


SUMMARY_KEYS = ("val/acc_best", "val/acc", "test/acc", "val/miou_best", "val/miou", "test/miou", "val/map_best", "test/map",
                "test/f1_macro")


def scalars(metrics: dict) -> dict[str, float]:
    """Lightning's callback metrics as plain rounded floats (one-element tensors only)."""
    return {k: round(float(v), 6) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def status(trainer: pl.Trainer) -> Status:
    """``pruned`` when an Optuna pruner stopped the job (callbacks/optuna_pruning.py), else ``ok``."""
    pruning = sys.modules.get("visionsweep.callbacks.optuna_pruning")  # not imported: no job of an Optuna sweep
    pruned = pruning is not None and any(isinstance(cb, pruning.OptunaPruning) and cb.pruned_at is not None
                                         for cb in trainer.callbacks)
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
