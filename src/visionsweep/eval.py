"""Evaluate a checkpoint: ``python -m visionsweep.eval ckpt_path=<run>/checkpoints/<x>.ckpt [split=val]``.

The data set, split files and eval pipeline come from the checkpoint's run dir, so the test/acc of
the training run is reproduced with nothing but the checkpoint path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from visionsweep import checkpoints, runinfo
from visionsweep.data.images import bad_image_advice
from visionsweep.errors import ConfigError
from visionsweep.utils import checks
from visionsweep.utils.atomic import atomic_write
from visionsweep.utils.cli import guarded, precheck

log = logging.getLogger("visionsweep.eval")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split``; returns the metrics (``<split>/acc`` or ``<split>/miou``...).

    Classifier and segmenter checkpoints both work: :mod:`visionsweep.checkpoints` reads the file
    weights-only and builds the module the checkpoint says it holds.
    """
    # eval has no data.* keys (the data comes from the training run): name the fixes that exist here
    with bad_image_advice("restore or replace it, or evaluate another folder with data_root=<folder>"):
        return _evaluate(cfg)


def _evaluate(cfg: DictConfig) -> dict[str, Any]:
    checks.keys(cfg, {"batch_size": lambda v, k: checks.whole(v, k, 1, None, 32, also=" or null (the run's)")})
    out = Path(cfg.paths.output_dir)
    loaded = checkpoints.load(cfg.ckpt_path, cfg.paths.log_dir)
    ckpt, run_dir, model = loaded.path, loaded.run_dir, loaded.model
    import pytorch_lightning as pl  # (heavy: after the checks above, so that a wrong path fails in a second)
    import torch

    from visionsweep import builders

    extra = {"batch_size": int(cfg.batch_size)} if cfg.get("batch_size") else {}
    dm = builders.checkpoint_datamodule(model, ckpt, run_dir, loaded.train_config(), cfg.get("data_root"), out,
                                        **extra)
    split = cfg.split
    if split not in ("test", "val"):
        raise ConfigError(f"split={split}: use test or val")
    if split == "test" and not dm.has_test:
        log.warning("no test split in this data set: evaluating on the val split")
        split = "val"
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    record = runinfo.RunRecord(out, task="eval", checkpoint=str(ckpt), train_run=str(run_dir),
                               split=split, data={"description": dm.describe(),
                                                  "fingerprint": dm.fingerprint()})
    # "warn": deterministic kernels wherever they exist; a GPU op without one (a segmenter's nll_loss2d)
    # warns instead of stopping the evaluation
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         deterministic="warn", enable_model_summary=False)
    trainer.test(model, dataloaders=loader, verbose=False)
    metrics = {k.replace("test/", f"{split}/"): round(float(v), 6)
               for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    record.finish(runinfo.Status.OK, metrics=metrics, test_report=model.test_report)
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2))
    shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith(("/acc", "/miou", "/loss")))
    print(f"\n{ckpt.name} on {split} ({len(loader.dataset)} images): {shown}  → {out}", flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@guarded
def _hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    """Console entry point."""
    precheck("eval")
    _hydra_main()


if __name__ == "__main__":
    main()
