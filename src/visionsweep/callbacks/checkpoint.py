"""Checkpoints that cost what they are for: the best as weights only, the last with the full state.

A resnet34 checkpoint with AdamW's moments is 3x its weights (255 MB vs 85 MB; vgg19: 1.6 GB vs
0.55 GB), and Lightning writes two per run. Only a resume needs the optimizer, scheduler, loop and
random states, and only from the last checkpoint, and only until the job has finished; eval, predict,
export and ``see`` read weights and hyper-parameters. So the best checkpoint is weights-only, and a
finished job drops its last checkpoint unless ``keep_last`` says otherwise (``auto``: kept by a
single run, which ``ckpt_path=latest`` may continue; dropped by sweep jobs).

A run resumed into a new run dir keeps competing with the best of the run it resumes: that file is
linked (or copied) into the new ``checkpoints/`` and keeps its score, so "best" (and the test run on
it) is the same as in an uninterrupted run. Lightning itself forgets the scores when the dir changes
and, with ``fast_dev_run``, still writes ``last.ckpt`` at the end of fit; neither happens here. And
``last.ckpt`` is the last epoch's (Lightning 2.6 only rewrites it when a top-k file is saved), at most
every ``last_every_s`` seconds and always at the end of fit: a full resnet34 state costs 0.4-0.8 s to write
(with fsync), ~10 % of a digits epoch, while a crash loses at most ``last_every_s`` of training.

:class:`RunState` adds what a checkpoint needs beyond Lightning's state for a resume to equal the
uninterrupted run.

**Random states.** Lightning saves weights, optimizer, scheduler and loop counters, but not the random
generators. Everything random in the data pipeline is drawn from torch's global generator: each epoch
the loader draws the epoch's augmentation seed (per-sample seeds are ``(epoch seed, index)``,
:mod:`visionsweep.data.seeding`), the worker base seed and the sampler's shuffling seed
(:class:`~visionsweep.data.seeding.SeededDataLoader` draws the same count whether its workers are
fresh or persistent). Dropout, stochastic depth and timm's Mixup draw from the torch / numpy / python
generators. So the checkpoint stores all of them (CUDA's too) as tensors and plain numbers (loadable
with ``torch.load(weights_only=True)``), and a resume restores them before Lightning builds the first
loader iterator. Resuming from an epoch-end checkpoint then ends with the same metrics as the run that
was never interrupted (CPU; on GPUs as far as the kernels are deterministic).

**The run's length.** One-cycle and cosine schedules (and the fine-tune callback's) are planned for the
run's total steps. A resume whose total differs (other ``trainer.max_epochs``, other data size or batch
size) is refused in one line at the start of fit, instead of running on at a learning rate neither
plan meant; without a length-dependent schedule (``scheduler=none``) training on for more epochs is fine.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn

from visionsweep.errors import ConfigError
from visionsweep.utils.atomic import atomic_open, tmp_path

log = logging.getLogger(__name__)


def _final_epoch(trainer: pl.Trainer) -> bool:
    """Whether this epoch end is the fit's last (checkpoint callbacks run after EarlyStopping's stop)."""
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    epochs_done = max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
    steps_done = max_steps is not None and max_steps > 0 and trainer.global_step >= max_steps
    return bool(trainer.should_stop or epochs_done or steps_done)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with a weights-only best file, one ``last.ckpt`` and a disk policy.

    Args:
        keep_last: keep ``last.ckpt`` once the job has finished: ``true``, ``false`` or ``auto``
            (kept in a single run, dropped in a sweep job).
        last_every_s: rewrite ``last.ckpt`` at an epoch end only when this many seconds have passed since
            it was last written (0: every epoch); the end of fit always writes it.
        **kwargs: ``ModelCheckpoint`` arguments (``dirpath``, ``monitor``, ``save_top_k``, ...).
    """

    def __init__(self, keep_last: bool | str = "auto", last_every_s: float = 0.0, **kwargs: Any) -> None:
        kwargs.setdefault("enable_version_counter", False)  # a resumed job overwrites, never last-v1.ckpt
        super().__init__(**kwargs)
        if keep_last not in (True, False, "auto"):
            from visionsweep.errors import ConfigError

            raise ConfigError(f"callbacks.model_checkpoint.keep_last={keep_last}: give true, false or auto")
        self.keep_last = keep_last
        self.last_every_s = float(last_every_s)
        self._last_written = time.monotonic()  # from the start of fit (set again in on_train_start)
        self._last_pending = False  # an epoch's last.ckpt was skipped by the interval
        self._last_step: int | None = None  # the global step last.ckpt was last written at

    def _is_last(self, filepath: str) -> bool:
        return Path(filepath).name == f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        configured = self.save_weights_only
        self.save_weights_only = configured or not self._is_last(filepath)
        try:
            super()._save_checkpoint(trainer, filepath)
        finally:
            self.save_weights_only = configured

    def drop_last(self, trainer: pl.Trainer, multirun: bool) -> Path | None:
        """Remove ``last.ckpt`` of a finished job when the policy says so; returns what was removed.

        Called by the training script once the job is finished (run.json says so), not at the end of fit:
        until then (calibration, test, cost) a stopped job is still resumed from last.ckpt.

        Args:
            trainer: The trainer whose fit has ended normally.
            multirun: True inside a sweep job (what ``auto`` decides on).
        """
        keep = self.keep_last if self.keep_last != "auto" else not multirun
        last = Path(self.last_model_path) if self.last_model_path else None
        if keep or last is None or not last.is_file() or not trainer.is_global_zero:
            return None
        last.unlink()
        self.last_model_path = ""
        log.info("finished: dropped %s (best kept as weights only; keep it with "
                 "callbacks.model_checkpoint.keep_last=true)", last)
        return last

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)

    def _ensure_last(self, trainer: pl.Trainer) -> None:
        """Write last.ckpt at every epoch-end save point: Lightning 2.6 writes it only when a top-k file
        was saved in the same step, so after an epoch that did not improve, last.ckpt was an older epoch
        and a resume from it re-trained epochs (with other random draws)."""
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer) and self._every_n_epochs >= 1
                and (trainer.current_epoch + 1) % self._every_n_epochs == 0):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_written, self._last_pending, self._last_step = time.monotonic(), False, None

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any],
                              force: bool = False) -> None:
        # (an exception's save runs on the failing rank alone: no broadcast there, it would wait forever)
        if not force and self.last_every_s > 0 and not _final_epoch(trainer) and not trainer.interrupted:
            # every rank must take the same decision (a save is collective): rank 0's clock decides
            due = trainer.strategy.broadcast(time.monotonic() - self._last_written >= self.last_every_s)
            if not due:
                self._last_pending = True
                return
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written, self._last_pending = time.monotonic(), False
        self._last_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:  # Lightning's on_train_end writes last.ckpt even then
            return
        if self.save_last and (self._last_pending or self._last_step not in (None, trainer.global_step)):
            # fit ended after a skipped save or past the last save point (max_time, max_steps, an epoch
            # without validation); a state from the middle of an epoch resumes close to, not exactly as, the run
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer), force=True)
        super().on_train_end(trainer, pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old_dir = state_dict.get("dirpath")
        if not old_dir or not self.dirpath or Path(old_dir).resolve() == Path(self.dirpath).resolve():
            return super().load_state_dict(state_dict)
        # resumed into another run dir: adopt the old top-k files and their scores
        adopted = {}
        for path, score in (state_dict.get("best_k_models") or {}).items():
            new = self._adopt(Path(path))
            if new is not None:
                adopted[path] = new
        best_k = {adopted[p]: s for p, s in (state_dict.get("best_k_models") or {}).items() if p in adopted}
        best = adopted.get(state_dict.get("best_model_path") or "")
        super().load_state_dict({
            **state_dict, "dirpath": self.dirpath, "best_k_models": best_k, "best_model_path": best or "",
            "best_model_score": state_dict.get("best_model_score") if best else None,
            "kth_best_model_path": adopted.get(state_dict.get("kth_best_model_path") or "", ""),
            "last_model_path": ""})
        if adopted:
            log.info("resumed into %s: the best checkpoint so far, %s, is linked there", self.dirpath,
                     Path(best or next(iter(best_k))).name)

    def _adopt(self, src: Path) -> str | None:
        """Hard-link (else copy, atomically) a checkpoint of the resumed run into this run's dirpath."""
        if not src.is_file():
            return None
        dst = Path(self.dirpath) / src.name
        tmp = tmp_path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.unlink(missing_ok=True)
            os.link(src, tmp)
            os.replace(tmp, dst)
        except OSError:
            tmp.unlink(missing_ok=True)
            with atomic_open(dst, "wb") as out, src.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
        return str(dst)


def drop_finished_last(trainer: pl.Trainer) -> Path | None:
    """A finished job's ``last.ckpt`` by its :class:`RunCheckpoint`'s ``keep_last`` policy (a sweep job drops
    it under ``auto``); called once run.json says finished, so a job stopped before that still resumes."""
    from visionsweep.utils.cli import is_multirun

    callback = trainer.checkpoint_callback
    return callback.drop_last(trainer, is_multirun()) if isinstance(callback, RunCheckpoint) else None


def capture_rng() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and python global generator states, as tensors and numbers."""
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global generators to a :func:`capture_rng` state."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), int(n["pos"]),
                         int(n["has_gauss"]), float(n["cached_gaussian"])))
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def run_plan(trainer: pl.Trainer) -> dict[str, int]:
    """Optimizer steps the run will make in all (-1: unbounded), its max_epochs and steps per epoch."""
    total = trainer.estimated_stepping_batches
    batches = trainer.num_training_batches
    per_epoch = -1 if math.isinf(batches) else math.ceil(batches / max(trainer.accumulate_grad_batches, 1))
    return {"total_steps": -1 if math.isinf(total) else int(total), "max_epochs": int(trainer.max_epochs or -1),
            "steps_per_epoch": int(per_epoch)}


class RunState(pl.Callback):
    """Stores random states and the run's plan in checkpoints; restores / checks them on resume."""

    def __init__(self) -> None:
        self._plan: dict[str, int] | None = None
        self._fitting = False
        self._saved_plan: dict[str, int] | None = None
        self._saved_schedulers: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return "visionsweep.RunState"  # stable across module moves

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng(), "plan": dict(self._plan or {})}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # runs just before load_state_dict; trainer.test(ckpt_path=...) must not touch the generators
        self._fitting = trainer.state.fn == TrainerFn.FITTING
        self._saved_schedulers = list(checkpoint.get("lr_schedulers") or []) if self._fitting else []

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._fitting:
            return
        self._saved_plan = dict(state_dict.get("plan") or {}) or None
        if state_dict.get("rng"):
            # now: before the strategy set-up, where the first train loader iterator is made
            restore_rng(state_dict["rng"])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plan = run_plan(trainer)
        if trainer.ckpt_path and self._fitting:
            self._check_schedule(trainer)
        self._fitting, self._saved_schedulers = False, []

    def _check_schedule(self, trainer: pl.Trainer) -> None:
        new, old = self._plan or {}, self._saved_plan or {}
        for config, saved in zip(trainer.lr_scheduler_configs, self._saved_schedulers):
            for key in ("total_steps", "T_max"):
                planned, now = saved.get(key), getattr(config.scheduler, key, None)
                if planned is not None and now is not None and int(planned) != int(now):
                    self._refuse(trainer, type(config.scheduler).__name__, int(planned), int(now), old, new)
        by_length = [cb for cb in trainer.callbacks if getattr(cb, "plans_by_run_length", False)]
        if by_length and old.get("total_steps") not in (None, new.get("total_steps")):
            self._refuse(trainer, type(by_length[0]).__name__, old["total_steps"], new["total_steps"], old, new)

    @staticmethod
    def _refuse(trainer: pl.Trainer, kind: str, planned: int, now: int, old: dict, new: dict) -> None:
        def shape(plan: dict) -> str:
            if not plan:
                return ""
            return f" (trainer.max_epochs={plan.get('max_epochs')}, {plan.get('steps_per_epoch')} steps per epoch)"

        epochs = old.get("max_epochs")
        same = f"trainer.max_epochs={epochs} and the same data and batch size" if epochs else \
            "the trainer.max_epochs, data and batch size it was started with"
        raise ConfigError(
            f"ckpt_path={trainer.ckpt_path}: its learning-rate schedule ({kind}) was planned for {planned} steps"
            f"{shape(old)}, this run would make {now}{shape(new)}, so the learning rate would follow neither "
            f"plan; resume with {same}, or train on from its weights in a new run "
            f"(model.pretrained_file={trainer.ckpt_path})")
