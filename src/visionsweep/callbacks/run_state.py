"""What a checkpoint needs beyond Lightning's state for a resume to equal the uninterrupted run.

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

import math
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

from visionsweep.errors import ConfigError


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
