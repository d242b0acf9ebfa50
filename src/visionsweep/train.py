"""Train a classifier: ``python -m visionsweep.train [model=vgg19] [augmentation=strong] [key=value ...]``.

compose (Hydra) → data + model [→ LR finder, tune.lr_find=true] → trainer (builders) → fit → test the
best checkpoint → run.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from visionsweep import gpus, ledger, runinfo
from visionsweep.runinfo import Status
from visionsweep.utils.atomic import atomic_write
from visionsweep.utils.cli import guarded, precheck, print_config_tree

log = logging.getLogger("visionsweep.train")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job as configured; returns its final metrics. Under DDP every rank runs this;
    only rank 0 (``lead``) writes the run dir's own files."""
    # torch, Lightning, timm (~7 s on 2 cores): imported after main() checked the command line (a typo: < 1 s)
    import pytorch_lightning as pl
    import torch

    from visionsweep import builders, distributed, run_config
    from visionsweep.callbacks.checkpoint import drop_finished_last
    from visionsweep.optim import tune_settings

    out, lead = Path(cfg.paths.output_dir), distributed.is_rank_zero()
    config_hash = ledger.config_hash(cfg)  # of the config as composed, before anything fills it in
    started, record, trainer, lr_found = round(time.time(), 3), None, None, None
    try:
        lease = gpus.current()  # taken by the GpuLease Hydra callback before this job's CUDA started
        started = round(lease.started, 3) if lease else started
        threads = torch.get_num_threads()  # set by the ThreadBudget Hydra callback (parallel.job_threads)
        if (devices := gpus.trainer_devices(lease)) is not None:  # a worker whose CUDA started earlier
            with open_dict(cfg):
                cfg.trainer.devices = devices
        resolved = run_config.complete(cfg)  # the config is final from here on (but the LR finder's lr)
        run_config.check_config(cfg)  # optimizer.lr=-1: one line, before the tree and before anything is written
        if lead:
            print_config_tree(cfg)  # what runs: data.image_size=auto, timm's mean/std, ... filled in
        resume, inp = resolved.resume, resolved.inputs
        distributed.check_batch_size(cfg)  # DDP: the global data.batch_size must divide among the ranks
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        log.info("seed %d, %d threads", cfg.seed, threads)
        dm = builders.build_datamodule(cfg, inp, out if lead else None)
        log.info("data: %s", dm.describe())
        builders.report_classes(cfg, dm)
        model = builders.build_model(cfg, dm, inp)
        if tune_settings(cfg)["lr_find"]:  # the LR finder's module is imported only when it runs
            from visionsweep.lr_find import lr_find
            model, lr_found = lr_find(cfg, model, dm, out, rebuild=lambda: builders.build_model(cfg, dm, inp))
        if lead:
            atomic_write(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            record = runinfo.RunRecord(
                out, task=cfg.task_name, overrides=_overrides(), seed=cfg.seed, backbone=cfg.model.backbone,
                augmentation=cfg.augmentation.get("name"), resumed_from=resume, input=inp.__dict__,
                data={"description": dm.describe(), "fingerprint": dm.fingerprint(), "classes": dm.classes,
                      "split": dm.split_source, "bad_images": [str(p) for p, _ in dm.bad_images],
                      "class_counts": dm.class_counts() if hasattr(dm, "class_counts") else None},
                params=builders.count_params(model), lr_find=lr_found, config_hash=config_hash,
                threads=threads, pretrained=getattr(model, "weights_report", None), started=started)
        start_epoch = pl.callbacks.LambdaCallback(  # epochs done before a resume, for images/s
            on_train_start=lambda tr, _: record and record.update(start_epoch=tr.current_epoch))
        trainer = builders.build_trainer(cfg, out, extra_callbacks=[start_epoch])
        if lead:
            record.update(gpu=gpus.record(lease, trainer.strategy.root_device.type == "cuda"))
            builders.record_logger_ids(trainer, record)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
        fit_s = time.perf_counter() - start
        metrics = runinfo.scalars(trainer.callback_metrics)
        if not distributed.end_of_fit(trainer):
            return metrics  # ranks > 0 are done: rank 0 tests alone and writes run.json
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        state = runinfo.status(trainer)
        calibration = None
        if cfg.get("calibrate") and state == Status.OK:  # T fitted on val, written into the best checkpoint
            from visionsweep.models.calibration import calibrate_checkpoint
            calibration = calibrate_checkpoint(model, dm, best, trainer.strategy.root_device)
        if cfg.get("test") and dm.has_test and state == Status.OK:
            distributed.tester(trainer).test(model, datamodule=dm, ckpt_path=best or None, verbose=False,
                                             weights_only=True)
            metrics.update(runinfo.scalars(model.trainer.callback_metrics))
        epochs = trainer.current_epoch - (record.data.get("start_epoch") or 0)
        floor = builders.baselines(dm) if getattr(model, "multilabel", False) else None  # what "learnt" must beat
        img_s = runinfo.images_per_s(metrics, trainer, dm, epochs, fit_s)
        test_report = getattr(model, "test_report", None) or {}
        record.update(
            metrics=metrics, best_checkpoint=best or None, epochs=trainer.current_epoch,
            fit_seconds=round(fit_s, 2), train_images_per_s=img_s, perf=runinfo.read_json(out / "perf.json"),
            calibration=calibration and {k: v for k, v in calibration.items() if k != "bins_before"},
            reliability=runinfo.reliability(test_report.pop("reliability", None), calibration, dm.has_test),
            test_report=test_report or None, baselines=floor)
        if state == Status.OK and (cfg.get("cost") or {}).get("enabled", True):  # after the test: the best weights
            record.update(cost=runinfo.measure_cost(cfg, model, trainer, fit_s, img_s))
        record.finish(state)
        if run_config.plots_wanted(cfg):  # plots/curves.png, plots/confusion.png (matplotlib only when drawn)
            from visionsweep.analysis.run_plots import write_run_plots
            write_run_plots(out, dm.classes, test_report.get("confusion_matrix"))
        drop_finished_last(trainer)  # finished (run.json says so): last.ckpt goes by its keep_last policy
        runinfo.print_summary(metrics, fit_s, out, state, floor)
        return metrics
    except BaseException as e:
        if how := runinfo.interrupted(e):  # Ctrl-C or SIGTERM: resumable, exit 130 / 143 (128 + the signal)
            if lead:
                runinfo.record_interrupt(record, trainer, out, how)
            raise SystemExit(130 if how == "Ctrl-C" else 143) from None
        full = runinfo.disk_full(e, out)
        if lead and (record is not None or full is not None):  # a full disk: "failed" even without run.json
            record = record or runinfo.RunRecord.unsaved(out, task=cfg.get("task_name"), overrides=_overrides(),
                                                         started=started)
            record.fail(**runinfo.failure(full or e))
        if full is not None and full is not e:
            raise full  # (its __cause__ is the OSError's chain; Python keeps the context chain acyclic)
        raise
    finally:
        builders.finish_wandb()
        distributed.restore_env()


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


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
