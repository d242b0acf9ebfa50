"""Input-bound diagnosis: per training epoch, how long the step waited for data vs how long it computed.

Logged as ``perf/*`` metrics (so they reach metrics.csv, the loggers and run.json's metrics) and written
per epoch to ``<run dir>/perf.json``; when the loader is the bottleneck a one-line warning names the fix.

Timing: the *wait* of a batch is the time from the end of the previous step to the start of this one
(the DataLoader ``next()`` plus Lightning's small per-batch overhead); the *step* is forward + backward +
optimizer. On CUDA the step end synchronises the device (``sync_cuda``), otherwise asynchronous kernels
would be billed to the next wait. The first ``warmup_batches`` of every epoch are left out of the rates
(worker start-up, cuDNN autotuning, torch.compile) and reported as ``perf/first_batch_s``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from visionsweep.utils.atomic import atomic_write

log = logging.getLogger("visionsweep.perf")


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(first.shape[0]) if hasattr(first, "shape") else len(first)


class DataWaitMonitor(pl.Callback):
    """Measure data wait vs step time per epoch and flag an input-bound run.

    Not Lightning's ``ThroughputMonitor`` (samples/s and FLOPs): this one splits each step's time into
    waiting for the loader and computing, and names the fix when the loader is the bottleneck.

    Args:
        threshold: Flag the epoch when more than this share of its time is spent waiting for data.
        warmup_batches: Batches at the start of every epoch left out of the rates.
        sync_cuda: Synchronise CUDA at each step end so that step times are real (costs little when
            the loader keeps up, since the next batch is already prefetched).
        filename: Written into the trainer's ``default_root_dir`` (the run dir); None writes nothing.
        log_metrics: Log ``perf/*`` through ``LightningModule.log``.
    """

    def __init__(self, threshold: float = 0.2, warmup_batches: int = 1, sync_cuda: bool = True,
                 filename: str | None = "perf.json", log_metrics: bool = True) -> None:
        super().__init__()
        if not 0.0 < float(threshold) < 1.0:
            from visionsweep.errors import ConfigError

            raise ConfigError(f"callbacks.throughput.threshold={threshold}: give a fraction in (0, 1), e.g. 0.2")
        self.threshold, self.warmup_batches = float(threshold), max(0, int(warmup_batches))
        self.sync_cuda, self.filename, self.log_metrics = bool(sync_cuda), filename, bool(log_metrics)
        self.epochs: list[dict[str, Any]] = []
        self.warned = False
        self.first_step_unix: float | None = None
        self.val_elapsed: list[list[float]] = []  # [epoch, seconds since fit start] when its val metrics exist
        self._fit_start = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self._wait = self._step = 0.0
        self._images = self._batches = 0
        self._first_batch_s = self._pending_wait = 0.0
        self._last_end = self._start = time.perf_counter()

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()  # epochs' elapsed_s count from here (sanity check included)
        if pl_module.device.type == "cuda":  # run.json cost.peak_mem_mb: this job's, not an earlier one's in
            torch.cuda.reset_peak_memory_stats(pl_module.device)  # the same (joblib, Ray) worker process

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the wall clock of each epoch's val metrics: the report's time to a target accuracy
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.val_elapsed.append([trainer.current_epoch, round(time.perf_counter() - self._fit_start, 3)])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        now = time.perf_counter()
        self._pending_wait = now - self._last_end
        self._start = now

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.sync_cuda and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if self.first_step_unix is None:
            self.first_step_unix = time.time()
        if self._batches < self.warmup_batches:
            self._first_batch_s += self._pending_wait + now - self._start
        else:
            self._wait += self._pending_wait
            self._step += now - self._start
            self._images += _batch_size(batch)
        self._batches += 1
        self._last_end = now

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stats = self.epoch_stats(trainer.current_epoch)
        if stats is None:
            return
        # after this epoch's validation (Lightning runs it before on_train_epoch_end): time to its val metrics
        stats["elapsed_s"] = round(time.perf_counter() - self._fit_start, 3)
        self.epochs.append(stats)
        if self.log_metrics:
            for key in ("img_s", "step_img_s", "loader_img_s", "data_wait_frac", "data_wait_ms", "step_ms",
                        "input_bound", "first_batch_s"):
                if stats.get(key) is not None:
                    pl_module.log(f"perf/{key}", float(stats[key]), on_step=False, on_epoch=True)
        if stats["input_bound"] and not self.warned:
            self.warned = True
            stats["warning"] = self.diagnosis(stats, trainer)
            log.warning(stats["warning"])
        self._write(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    # ------------------------------------------------------------------ results
    def epoch_stats(self, epoch: int) -> dict[str, Any] | None:
        """Rates of the epoch measured so far (None before any counted batch)."""
        if not self._images:
            return None
        total = self._wait + self._step
        n_batches = self._batches - min(self._batches, self.warmup_batches)
        frac = self._wait / total if total > 0 else 0.0
        return {
            "epoch": epoch,
            "images": self._images,
            "img_s": round(self._images / total, 2) if total > 0 else None,  # what the run achieved
            "step_img_s": round(self._images / self._step, 2) if self._step > 0 else None,  # model alone
            "loader_img_s": self._loader_rate(frac),
            "data_wait_frac": round(frac, 4),
            "data_wait_ms": round(1000 * self._wait / n_batches, 3),
            "step_ms": round(1000 * self._step / n_batches, 3),
            "input_bound": int(frac > self.threshold),
            "first_batch_s": round(self._first_batch_s, 4),
        }

    def _loader_rate(self, frac: float) -> float | None:
        # In-process loading (or a loader that makes the step wait) reveals its rate; a loader that keeps
        # up only shows "at least the step rate", so nothing is claimed then.
        if getattr(self, "_workers", None) == 0 and self._wait > 0:
            return round(self._images / self._wait, 2)
        if frac > 0.05 and self._wait + self._step > 0:
            return round(self._images / (self._wait + self._step), 2)
        return None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._workers = getattr(trainer.datamodule, "num_workers", None) if trainer.datamodule else None

    def diagnosis(self, stats: dict[str, Any], trainer: pl.Trainer | None = None) -> str:
        """The one-line warning for an input-bound epoch, naming the fixes that apply."""
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        fixes = []
        workers = getattr(dm, "num_workers", None)
        from visionsweep.parallel import node_cores

        cores = node_cores()
        if workers is None or workers < (cores or 1):
            now = f"now {workers}, " if workers is not None else ""
            fixes.append(f"more loader workers (data.num_workers: {now}this machine has {cores} cores, "
                         "data.num_workers=auto uses them all)")
        if getattr(dm, "cache_mode", "none") == "none":
            fixes.append("enable the decoded-sample cache (data.cache=memory, or disk to share it across runs)")
        fixes.append("smaller images (resize the files, or a smaller data.image_size)")
        return (f"input-bound: {100 * stats['data_wait_frac']:.0f}% of epoch {stats['epoch']} spent waiting for "
                f"data ({stats['img_s']} img/s vs {stats['step_img_s']} img/s the model could take): "
                + "; ".join(fixes))

    def summary(self) -> dict[str, Any]:
        """Everything measured so far (the content of perf.json)."""
        return {"epochs": self.epochs, "val_elapsed_s": self.val_elapsed, "first_step_unix": self.first_step_unix,
                "threshold": self.threshold, "input_bound": any(e["input_bound"] for e in self.epochs)}

    @rank_zero_only
    def _write(self, trainer: pl.Trainer) -> None:
        if not self.filename or trainer.sanity_checking:
            return
        atomic_write(Path(trainer.default_root_dir) / self.filename, json.dumps(self.summary(), indent=2))
