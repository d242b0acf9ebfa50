"""Learning-rate finder before training: ``python -m visionsweep.train tune.lr_find=true``.

Lightning's ``Tuner.lr_find`` (Leslie Smith's range test, as fastai's ``lr_find``) runs on a throw-away
trainer: the lr grows exponentially from ``min_lr`` to ``max_lr`` over ``num_training`` batches while
the loss is recorded. With ``training=fine_tune`` the body is frozen during the test, as fastai's
``lr_find`` on a freshly created learner is, so the suggestion is the base lr of the fine-tune.

Writes ``plots/lr_find.png`` (loss vs lr, suggestion marked) and ``lr_find.json`` in the run dir; the
result also goes to run.json. ``tune.use_suggestion=true`` sets ``optimizer.lr`` to the suggestion and
rebuilds the model from the same seed, so the run equals one started with that lr by hand.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.tuner import Tuner

from visionsweep.errors import ConfigError
from visionsweep.optim import TUNE_RULES as RULES, tune_settings
from visionsweep.utils.atomic import atomic_write, save_figure

log = logging.getLogger(__name__)



def valley(losses: list[float]) -> int:
    """Index of fastai's ``valley`` suggestion: the longest stretch where the loss keeps falling.

    The steepest-gradient rule (Lightning's ``suggestion()``) is easily fooled by noise on a flat
    plateau far left of where the loss really falls (measured on digits: 3.3e-05, which trains to
    chance). fastai's rule takes the longest decreasing subsequence of the (smoothed) loss and
    returns a point part-way down it (at 1/3 + 1/6 of its length), inside the slope.

    Args:
        losses: the finder's smoothed losses, in lr order.
    """
    n = len(losses)
    longest, start, end = [1] * n, 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[end] < longest[i]:
                end, start = i, i - longest[i]
    third = (end - start) / 3
    return start + int(third) + int(third / 2)


def lr_find(cfg: DictConfig, model: pl.LightningModule, dm: pl.LightningDataModule, out: Path,
            rebuild: Callable[[], pl.LightningModule]) -> tuple[pl.LightningModule, dict[str, Any] | None]:
    """Run the LR finder when ``tune.lr_find`` is set; returns the model to train and the result.

    Args:
        cfg: the run's config (``optimizer.lr`` is replaced by the suggestion when it is used).
        model: the freshly built model (its weights are restored after the test).
        dm: the data module (its train loader feeds the test).
        out: the run dir.
        rebuild: builds the model again from ``cfg`` (called after re-seeding when the lr changed).

    Returns:
        ``(model, result)``; result is None when the finder did not run.
    """
    opts = tune_settings(cfg)
    if not opts["lr_find"]:
        return model, None
    from visionsweep.distributed import processes_per_node

    if processes_per_node(cfg.trainer) > 1:
        raise ConfigError("tune.lr_find runs on one device: find the lr without trainer=ddp, then train "
                          "with optimizer.lr=<suggestion>")
    steps = int(opts["num_training"])
    if steps < 20:
        raise ConfigError(f"tune.num_training={steps}: give at least 20 steps (the suggestion skips the first 10)")
    tcfg = cfg.trainer
    trainer = pl.Trainer(
        accelerator=tcfg.get("accelerator", "auto"), devices=1, precision=tcfg.get("precision", "32-true"),
        max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,  # a second bar would only clutter the log
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(out),
        accumulate_grad_batches=tcfg.get("accumulate_grad_batches", 1),
        gradient_clip_val=tcfg.get("gradient_clip_val"), deterministic=tcfg.get("deterministic", False))
    train_bn = finetune_train_bn(cfg)
    if train_bn is not None:
        from visionsweep.callbacks.finetune import set_body_frozen

        set_body_frozen(model.net, True, train_bn)
    finder = Tuner(trainer).lr_find(
        model, datamodule=dm, min_lr=float(opts["min_lr"]), max_lr=float(opts["max_lr"]),
        num_training=steps, mode=str(opts["mode"]), early_stop_threshold=opts["early_stop_threshold"],
        update_attr=False)
    if finder is None:  # fast_dev_run
        return model, None
    rule = str(opts["suggest"])
    if rule not in RULES:
        raise ConfigError(f"tune.suggest={rule}: choose from {', '.join(RULES)}")
    lrs, losses = list(finder.results["lr"]), [float(v) for v in finder.results["loss"]]
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    if rule == "valley" and len(finite) >= 3:
        idx = finite[valley([losses[i] for i in finite])]
        suggestion: float | None = float(lrs[idx])
    else:
        suggestion = finder.suggestion()
        idx = getattr(finder, "_optimal_idx", None)
    suggestion = float(suggestion) if suggestion is not None and math.isfinite(suggestion) else None
    plot = out / "plots" / "lr_find.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    _save_plot(lrs, losses, idx if suggestion is not None else None, rule, plot)
    result = {"suggestion": suggestion, "rule": rule, "configured_lr": float(cfg.optimizer.lr), "used": False,
              "plot": str(plot), "min_lr": float(opts["min_lr"]), "max_lr": float(opts["max_lr"]),
              "steps": len(finder.results["lr"]), "body_frozen": train_bn is not None}
    atomic_write(out / "lr_find.json", json.dumps({**result, **finder.results}, indent=1))
    print(f"\nlr finder: suggested lr {suggestion if suggestion is None else f'{suggestion:.3g}'} "
          f"(configured {cfg.optimizer.lr:g})  → {plot}", flush=True)
    if opts["use_suggestion"]:
        if suggestion is None:
            log.warning("lr finder gave no suggestion (too few points or a flat loss): keeping optimizer.lr=%g",
                        cfg.optimizer.lr)
        else:
            cfg.optimizer.lr = suggestion
            result["used"] = True
    pl.seed_everything(cfg.seed, workers=True)  # the run starts as if the finder had not run
    return rebuild(), result


def finetune_train_bn(cfg: DictConfig) -> bool | None:
    """``train_bn`` of the run's fine-tune callback (``callbacks.*._target_`` a FineTune), None without one."""
    for node in (cfg.get("callbacks") or {}).values():
        if node and str(node.get("_target_", "")).endswith("FineTune"):
            from visionsweep.callbacks.finetune import FineTune

            default = inspect.signature(FineTune).parameters["train_bn"].default
            return bool(node.get("train_bn", default))
    return None


def _save_plot(lrs: list[float], losses: list[float], idx: int | None, rule: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses, color="tab:blue")
    if idx is not None:
        ax.plot([lrs[idx]], [losses[idx]], "o", color="tab:red", markersize=9,
                label=f"suggested lr {lrs[idx]:.2g} ({rule})")
        ax.legend(loc="upper left")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title("learning-rate finder: pick an lr where the loss is still falling")
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)
