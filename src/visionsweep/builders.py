"""Config → objects: the data module (with its augmentation), the model, loggers, callbacks, trainer.

Shared by the entry points so that train, eval and later commands build things the same way.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra.utils
import pytorch_lightning as pl
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger

from visionsweep import augment
from visionsweep.errors import ConfigError, VisionSweepError
from visionsweep.models.backbones import InputConfig, resolve_input_config
from visionsweep.utils import checks

# the trial the Optuna sweeper hands a job (callbacks.optuna_pruning.ENV; not imported outside such a sweep)
OPTUNA_TRIAL_ENV = "VISIONSWEEP_OPTUNA_TRIAL"
log = logging.getLogger(__name__)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose failures name the config node in one line."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, VisionSweepError):
            raise cause from None
        target = node.get("_target_", "?") if isinstance(node, (dict, DictConfig)) else "?"
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"cannot build {target}: {first}") from e


def as_int(value: Any, key: str, minimum: int | None = None) -> int:
    """``value`` as a whole number ≥ ``minimum``, or a ConfigError naming ``key``
    (:func:`visionsweep.utils.checks.whole`)."""
    also = " or auto" if key == "data.image_size" else ""
    return checks.whole(value, key, minimum, None, 224 if also else None, also=also)


def resolve_inputs(cfg: DictConfig) -> InputConfig:
    """Fill ``data.image_size/crop_pct/interpolation`` and the mean/std from the backbone's timm config.

    Values already set in the config win; a training job does this in
    :func:`visionsweep.run_config.complete`, so the filled config is what it records. A side too large
    for memory (``data.image_size=100000``) stops here, before any image or model is made at that size.
    """
    size = cfg.data.get("image_size")
    if size not in (None, "auto"):
        size = as_int(size, "data.image_size", 8)
        batch = checks._as_whole(cfg.data.get("batch_size"))
        checks.check_image_size(size, batch if batch and batch > 0 else None)
    crop = cfg.data.get("crop_pct")
    if crop is not None:
        crop = checks.number(crop, "data.crop_pct", 0, 1, 0.875, low_open=True)
    inp = resolve_input_config(
        cfg.model.backbone, size, cfg.model.get("mean"), cfg.model.get("std"), crop,
        cfg.data.get("interpolation"),
        check_size=cfg.get("task") != "segment",  # the segmenter pads any size to its encoder's stride
    )
    if crop is not None and inp.image_size / crop > checks.MAX_IMAGE_SIDE:  # the eval view's resize side
        raise checks.fail("data.crop_pct", crop, f"a larger fraction (data.image_size={inp.image_size} / {crop} "
                          f"resizes images to {round(inp.image_size / crop)} px, over {checks.MAX_IMAGE_SIDE})", 0.875)
    cfg.data.image_size, cfg.data.crop_pct, cfg.data.interpolation = (
        inp.image_size, inp.crop_pct, inp.interpolation)
    return inp


def build_datamodule(cfg: DictConfig, inp: InputConfig, output_dir: str | Path | None,
                     **overrides: Any) -> pl.LightningDataModule:
    """Instantiate ``cfg.data`` with the pipelines of ``cfg.augmentation``, then prepare and scan it."""
    train_tf, eval_tf = augment.build_pipelines(
        cfg.augmentation, inp.image_size, inp.crop_pct, inp.interpolation)
    sizes = {"image_size": inp.image_size, "crop_pct": inp.crop_pct, "interpolation": inp.interpolation}
    dm = instantiate(cfg.data, output_dir=str(output_dir) if output_dir else None,
                     train_transform=train_tf, eval_transform=eval_tf, **{**sizes, **overrides})
    dm.prepare_data()
    dm.setup("fit")
    if output_dir is not None:  # only once the data is known good: a failed setup leaves nothing
        augment.save_pipelines(train_tf, eval_tf, Path(output_dir) / "augmentation.json")
    return dm


def checkpoint_datamodule(model: Any, ckpt: Path, run_dir: Path, train_cfg: DictConfig | None,
                          data_root: str | None = None, output_dir: str | Path | None = None,
                          fallback: str = "", **overrides: Any) -> pl.LightningDataModule:
    """The data module a checkpoint was trained on, with its run's own split (eval, ``see``).

    Args:
        model: The loaded module (its hyper-parameters give the input config and class names).
        ckpt: The checkpoint file (named in errors).
        run_dir: Its training run dir (``config.yaml``, ``splits/``).
        train_cfg: That run's config (None: a ConfigError naming the missing file).
        data_root: Another folder with the same classes instead of the run's split.
        output_dir: Where the data module writes its split files (None: nowhere).
        fallback: What the user can do instead, appended to the missing-config error.
        **overrides: More data-module arguments (``batch_size``...).
    """
    if train_cfg is None:
        raise ConfigError(f"ckpt_path '{ckpt}': no config.yaml in its run dir {run_dir} "
                          f"(was it written by visionsweep.train?){fallback}")
    hp = model.hparams
    inp = InputConfig(hp.image_size, tuple(hp.mean), tuple(hp.std), hp.crop_pct, hp.interpolation)
    if data_root:
        overrides["root"] = str(Path(data_root).expanduser().resolve())
    elif (run_dir / "splits").is_dir():
        overrides["split_dir"] = str(run_dir / "splits")
    dm = build_datamodule(train_cfg, inp, output_dir, **overrides)
    if list(dm.classes) != list(model.class_names):
        raise ConfigError(f"data classes {dm.classes} differ from the checkpoint's {list(model.class_names)}")
    return dm


def report_classes(cfg: DictConfig, dm: Any) -> None:
    """Log each split's class counts; warn when the training classes are imbalanced beyond 3:1 and the run
    chooses its checkpoint (or a sweep its configuration) by plain accuracy, naming the better metrics."""
    if not hasattr(dm, "class_count_lines"):
        return
    for line in dm.class_count_lines():
        log.info("class counts, %s", line)
    from visionsweep.data.splits import IMBALANCE_RATIO

    ratio = dm.train_imbalance()
    monitor = ((cfg.get("callbacks") or {}).get("model_checkpoint") or {}).get("monitor")
    chosen = [m for m in (monitor, cfg.get("optimized_metric")) if m in ("val/acc", "val/acc_best")]
    if dm.multilabel or ratio <= IMBALANCE_RATIO or not chosen:
        return
    log.warning("the training classes are imbalanced (largest / smallest = %s) and %s is plain accuracy, which a "
                "model that ignores the small classes still scores well on: choose by val/f1_macro or "
                "val/acc_balanced (callbacks.model_checkpoint.monitor=val/f1_macro optimized_metric=val/f1_macro), "
                "and consider data.balance=weights or sampler", "inf" if ratio == float("inf") else f"{ratio:.1f}:1",
                " and ".join(dict.fromkeys(chosen)))


def baselines(dm: Any) -> dict[str, Any]:
    """Multi-label: the image-blind baselines on the test split (val without one), with its name."""
    from visionsweep.models.multilabel import baselines as blind

    split = "test" if dm.has_test else "val"
    labels = [y for _, y in (dm.test_samples if dm.has_test else dm.val_samples)]
    return {"split": split, **blind([y for _, y in dm.train_samples], labels)}


def build_model(cfg: DictConfig, dm: Any, inp: InputConfig) -> pl.LightningModule:
    """Instantiate ``cfg.model`` for the data set's classes and the backbone's input config."""
    container = lambda node: OmegaConf.to_container(node, resolve=True) if node else None  # noqa: E731
    extra = {k: v for k, v in asdict(inp).items()}
    data_multi, model_multi = bool(getattr(dm, "multilabel", False)), bool(cfg.model.get("multilabel", False))
    if data_multi != model_multi:
        raise ConfigError("the data has several labels per image: add task=multilabel" if data_multi else
                          "model.multilabel=true needs multi-label data: use task=multilabel (it sets both)")
    weights = dm.loss_weights() if hasattr(dm, "loss_weights") else None
    if weights is not None:
        extra["class_weights"] = weights
    return instantiate(cfg.model, num_classes=dm.num_classes, class_names=list(dm.classes),
                       optimizer=container(cfg.get("optimizer")),
                       scheduler=container(cfg.get("scheduler")), _recursive_=False, _convert_="all",
                       **extra)


def build_loggers(cfg: DictConfig, output_dir: str | Path) -> list[Logger]:
    """Loggers of ``cfg.logger``; a CSV logger is always there (reports read metrics.csv back).

    The config is used as it is: a training job's wandb and MLflow run names are in it already
    (:func:`visionsweep.run_config.complete`), so the saved config.yaml holds them too.
    """
    os.environ.setdefault("WANDB_MODE", "offline")  # never hang or ask for an API key
    # the run dir already holds .hydra/: Lightning's "not empty, logs will be deleted" is noise here
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    from visionsweep.utils.safe_io import CSV_TARGETS, AtomicCSVLogger

    # metrics.csv is written whole under a temporary name, then renamed: never a torn row. A config naming
    # Lightning's CSVLogger (conf/logger/csv.yaml: its name stays, so the config hashes of existing sweeps
    # do too) gets ours, with the same arguments
    atomic = f"{AtomicCSVLogger.__module__}.{AtomicCSVLogger.__name__}"
    loggers = [instantiate(node, **({"_target_": atomic} if node.get("_target_") in CSV_TARGETS else {}))
               for node in (cfg.get("logger") or {}).values() if node]
    if not any(isinstance(lg, CSVLogger) for lg in loggers):
        loggers.insert(0, AtomicCSVLogger(save_dir=str(output_dir), name="", version=""))
    for lg in loggers:  # Lightning passes anonymous=None, and wandb warns that it "has no effect" every run
        init = getattr(lg, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)
    return loggers


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Callbacks of ``cfg.callbacks`` (a mapping name → config).

    A node without ``_target_`` is skipped: it only adjusts a callback this config does not have
    (``debug=fast`` turns off the ``model_checkpoint`` of ``callbacks=default``, also under ``callbacks=null``).
    So is one with ``enabled: false`` (``callbacks.compile``), and Optuna pruning outside an Optuna sweep
    (no trial to report to): a job does not import what it does not use.
    """
    built = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if not node or (isinstance(node, (dict, DictConfig)) and "_target_" not in node):
            continue
        if str(node.get("_target_")).endswith(".OptunaPruning") and not os.environ.get(OPTUNA_TRIAL_ENV):
            continue
        enabled = node.get("enabled", True) if isinstance(node, (dict, DictConfig)) else True
        if not checks.flag(enabled, f"callbacks.{name}.enabled"):  # (check_config has named a bad one already)
            continue
        built.append(instantiate(node))
    return built


def build_trainer(cfg: DictConfig, output_dir: str | Path,
                  extra_callbacks: list[pl.Callback] | None = None, **kwargs: Any) -> pl.Trainer:
    """The Lightning Trainer of ``cfg.trainer`` with loggers and callbacks.

    Always added: :class:`~visionsweep.callbacks.checkpoint.RunState` (random states and the run's plan
    in every checkpoint, so a resume equals the uninterrupted run) and
    :class:`~visionsweep.utils.safe_io.AtomicCheckpointIO` (checkpoints written whole or not at all),
    unless ``trainer.plugins`` already brings a CheckpointIO.
    """
    from pytorch_lightning.plugins.io import CheckpointIO

    from visionsweep.callbacks.checkpoint import RunState
    from visionsweep.utils.safe_io import AtomicCheckpointIO

    callbacks = build_callbacks(cfg) + list(extra_callbacks or [])
    if not any(isinstance(cb, RunState) for cb in callbacks):
        callbacks.append(RunState())
    plugins = kwargs.pop("plugins", None) or instantiate(cfg.trainer.get("plugins")) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return instantiate(cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg, output_dir),
                       plugins=plugins, **kwargs)


def count_params(model: Any) -> dict[str, int]:
    """Total and trainable parameter counts."""
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


def record_logger_ids(trainer: pl.Trainer, record: Any) -> None:
    """Store the wandb run id in run.json (a resume continues the same wandb run)."""
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            record.update(wandb_id=lg.experiment.id, wandb_dir=str(lg.save_dir))  # starts the run now


def finish_wandb() -> None:
    """Close the wandb run, if any."""
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()  # else the next job of a sweep logs into this run
