"""Temperature scaling of a trained classifier: ``python -m visionsweep.calibrate ckpt_path=<x>.ckpt``.

Fits one temperature on the run's validation logits (:mod:`visionsweep.models.calibration`), measures ECE,
NLL and Brier score before and after on the test split (val without one), and writes a calibrated copy
of the checkpoint into this command's run dir, with ``calibration.json`` and ``reliability.png`` beside it.
The checkpoint given is never changed. ``train calibrate=true`` does the same at the end of training.
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
from visionsweep.utils import checks
from visionsweep.utils.atomic import atomic_open, atomic_write
from visionsweep.utils.cli import guarded, precheck

log = logging.getLogger("visionsweep.calibrate")


def calibrate(cfg: DictConfig) -> dict[str, Any]:
    """Calibrate ``cfg.ckpt_path``; returns run.json's ``calibration`` record."""
    checks.keys(cfg, {"batch_size": lambda v, k: checks.whole(v, k, 1, None, 32, also=" or null (the run's)")})
    out = Path(cfg.paths.output_dir)
    loaded = checkpoints.load(cfg.ckpt_path, cfg.paths.log_dir, kind="classifier")
    import torch

    from visionsweep import builders
    from visionsweep.models import calibration as cal

    model = loaded.model
    if model.multilabel:
        raise checkpoints.CheckpointError(f"{loaded.path} is a multi-label classifier: temperature scaling "
                                          "calibrates a softmax (single-label classes)")
    extra = {"batch_size": int(cfg.batch_size)} if cfg.get("batch_size") else {}
    with bad_image_advice("restore or replace it, or calibrate on another folder with data_root=<folder>"):
        dm = builders.checkpoint_datamodule(model, loaded.path, loaded.run_dir, loaded.train_config(),
                                            cfg.get("data_root"), out, **extra)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        split = "test" if dm.has_test else "val"
        val = cal.collect_logits(model, dm.val_dataloader(), device)
        measure = cal.collect_logits(model, dm.test_dataloader(), device) if split == "test" else val
    record = runinfo.RunRecord(out, task="calibrate", checkpoint=str(loaded.path), train_run=str(loaded.run_dir))
    before_t = float(model.temperature)
    result = cal.calibrate(model, val, measure, split)
    ck = checkpoints.read(loaded.path)  # the file as it is, with the new temperature in its weights
    ck["state_dict"]["temperature"] = model.temperature.detach().cpu().clone()
    ck.setdefault("visionsweep", {})["calibration"] = {k: v for k, v in result.items() if k != "bins_before"}
    target = out / f"{loaded.path.stem}.calibrated.ckpt"
    with atomic_open(target, "wb") as f:
        torch.save(ck, f)
    after_bins = cal.reliability((measure[0].double() / model.temperature.double()).softmax(dim=1), measure[1])
    reliability = {"split": split, **after_bins, "before": result.pop("bins_before")}
    result["previous_temperature"] = round(before_t, 6)
    atomic_write(out / "calibration.json", json.dumps({**result, "reliability": reliability}, indent=2))
    record.finish(runinfo.Status.OK, calibration=result, reliability=reliability, checkpoint_out=str(target))
    from visionsweep.report.calibration import plot_reliability  # the report's diagram

    plot_reliability([(loaded.path.stem, reliability)], out / "reliability.png")
    print(f"\ntemperature {result['temperature']:.4f} (fitted on val, {result['n_fit']} images); on {split} "
          f"({result['n_measured']} images): ECE {result['ece_before']:.4f} -> {result['ece_after']:.4f}, "
          f"NLL {result['nll_before']:.4f} -> {result['nll_after']:.4f}, Brier {result['brier_before']:.4f} -> "
          f"{result['brier_after']:.4f}\ncalibrated checkpoint: {target}", flush=True)
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="calibrate")
@guarded
def _hydra_main(cfg: DictConfig) -> None:
    calibrate(cfg)


def main() -> None:
    """Console entry point."""
    precheck("calibrate")
    _hydra_main()


if __name__ == "__main__":
    main()
