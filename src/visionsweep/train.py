"""Train a classifier: ``python -m visionsweep.train [model=vgg19] [augmentation=strong] [key=value ...]``.

compose (Hydra) → data + model [→ LR finder, tune.lr_find=true] → trainer (builders) → fit → test the
best checkpoint → run.json.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from visionsweep import builders, runinfo, tune
from visionsweep.errors import DiskFullError, exception_chain
from visionsweep.utils.atomic import atomic_write, disk_full_cause
from visionsweep.utils.cli import guarded, is_multirun, precheck, user_error
from visionsweep.utils.config import print_config_tree, resume_checkpoint

log = logging.getLogger("visionsweep.train")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job as configured; returns its final metrics."""
    out = Path(cfg.paths.output_dir)
    print_config_tree(cfg)
    record = None
    try:
        cfg.seed = builders.as_int(cfg.seed, "seed", 0)
        builders.check_optimizer(cfg)  # optimizer.lr=-1: one line, before anything is written
        pl.seed_everything(cfg.seed, workers=True)
        resume = resume_checkpoint(cfg)
        inp = builders.resolve_inputs(cfg)
        dm = builders.build_datamodule(cfg, inp, out)
        log.info("data: %s", dm.describe())
        model = builders.build_model(cfg, dm, inp)
        model, lr_found = tune.lr_find(cfg, model, dm, out, rebuild=lambda: builders.build_model(cfg, dm, inp))
        atomic_write(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        record = runinfo.RunRecord(
            out, task=cfg.task_name, overrides=_overrides(), seed=cfg.seed, backbone=cfg.model.backbone,
            augmentation=cfg.augmentation.get("name"), resumed_from=resume, input=inp.__dict__,
            data={"description": dm.describe(), "fingerprint": dm.fingerprint(), "classes": dm.classes,
                  "split": dm.split_source, "bad_images": [str(p) for p, _ in dm.bad_images]},
            params=builders.count_params(model), lr_find=lr_found,
            pretrained=getattr(model, "weights_report", None))
        start_epoch = pl.callbacks.LambdaCallback(  # epochs done before a resume, for images/s
            on_train_start=lambda tr, _: record.update(start_epoch=tr.current_epoch))
        trainer = builders.build_trainer(cfg, out, extra_callbacks=[start_epoch])
        builders.record_logger_ids(trainer, record)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm, ckpt_path=str(resume) if resume else None)
        fit_s = time.perf_counter() - start
        metrics = _scalars(trainer.callback_metrics)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if cfg.get("test") and dm.has_test:
            trainer.test(model, datamodule=dm, ckpt_path="best" if best else None, verbose=False)
            metrics.update(_scalars(trainer.callback_metrics))
        epochs = trainer.current_epoch - (record.data.get("start_epoch") or 0)
        record.update(
            status="ok", metrics=metrics, best_checkpoint=best or None, epochs=trainer.current_epoch,
            fit_seconds=round(fit_s, 2),
            train_images_per_s=runinfo.images_per_s(metrics, trainer, dm, epochs, fit_s),
            perf=runinfo.read_json(out / "perf.json"),
            test_report=getattr(model, "test_report", None) or None)
        _drop_last_checkpoint(trainer)
        _print_summary(metrics, fit_s, out)
        return metrics
    except BaseException as e:
        full = _disk_full(e, out)
        err = full or (user_error(e) if isinstance(e, Exception) else None)
        if record is not None or full is not None:  # a full disk: say "failed" even before run.json existed
            record = record or runinfo.RunRecord.unsaved(out, task=cfg.get("task_name"), overrides=_overrides())
            record.fail(str(err or f"{type(e).__name__}: {e}"))
        elif err is not None and not is_multirun():
            _remove_if_only_hydra_files(out)  # a bad path or value leaves no half-made run dir
        if full is not None and full is not e:
            raise full  # (its __cause__ is the OSError's chain; Python keeps the context chain acyclic)
        raise
    finally:
        builders.finish_wandb()


def _disk_full(e: BaseException, out: Path) -> DiskFullError | None:
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


def _drop_last_checkpoint(trainer: pl.Trainer) -> None:
    """A finished sweep job drops its last.ckpt (RunCheckpoint's keep_last policy)."""
    drop = getattr(trainer.checkpoint_callback, "drop_last", None)
    if callable(drop):
        drop(trainer, is_multirun())


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def _remove_if_only_hydra_files(out: Path) -> None:
    if out.is_dir() and {p.name for p in out.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(out, ignore_errors=True)


def _print_summary(metrics: dict[str, float], seconds: float, out: Path) -> None:
    keys = ("val/acc_best", "val/acc", "test/acc", "val/miou_best", "val/miou", "test/miou")
    shown = "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)
    print(f"\n{shown}  ({seconds:.0f} s)  → {out}", flush=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@guarded
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


def main() -> None:
    """Console entry point: check the overrides, then hand over to Hydra."""
    precheck("train")
    _hydra_main()


if __name__ == "__main__":
    main()
