"""metrics.csv across a resume in the same run dir (a resumed sweep job): earlier epochs are kept."""

from __future__ import annotations

import csv

from visionsweep.utils.safe_io import AtomicExperimentWriter


def _rows(path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_a_writer_in_a_dir_with_metrics_keeps_the_finished_epochs(tmp_path):
    first = AtomicExperimentWriter(str(tmp_path))
    first.log_metrics({"lr": 0.1}, step=0)  # epoch 0 starts
    first.log_metrics({"train/loss": 2.0, "epoch": 0}, step=10)
    first.log_metrics({"val/acc": 0.5, "epoch": 0}, step=20)  # epoch 0 ends (checkpoint at step 20)
    first.log_metrics({"lr": 0.05}, step=20)  # epoch 1 starts
    first.log_metrics({"train/loss": 1.5, "epoch": 1}, step=30)  # ... killed during epoch 1
    first.save()
    resumed = AtomicExperimentWriter(str(tmp_path))  # resumed from the step-20 checkpoint
    resumed.log_metrics({"lr": 0.05}, step=20)
    resumed.log_metrics({"train/loss": 1.4, "epoch": 1}, step=30)
    resumed.log_metrics({"val/acc": 0.7, "epoch": 1}, step=40)
    resumed.save()
    rows = _rows(tmp_path / "metrics.csv")
    assert [(r["step"], r.get("epoch")) for r in rows] == [("0", ""), ("10", "0"), ("20", "0"), ("20", ""),
                                                          ("30", "1"), ("40", "1")]
    assert [r["train/loss"] for r in rows if r["train/loss"]] == ["2.0", "1.4"]  # epoch 1 once, the new one


def test_a_fresh_run_in_a_used_dir_starts_over(tmp_path):
    old = AtomicExperimentWriter(str(tmp_path))
    old.log_metrics({"val/acc": 0.1, "epoch": 0}, step=5)
    old.save()
    new = AtomicExperimentWriter(str(tmp_path))  # a failed job run again from scratch: from step 0
    new.log_metrics({"lr": 0.1}, step=0)
    new.log_metrics({"val/acc": 0.9, "epoch": 0}, step=5)
    new.save()
    assert [r["val/acc"] for r in _rows(tmp_path / "metrics.csv") if r["val/acc"]] == ["0.9"]


def test_a_config_naming_lightnings_csv_logger_gets_the_atomic_one_with_its_arguments(tmp_path):
    from conftest import compose_cfg

    from visionsweep import builders
    from visionsweep.utils.safe_io import AtomicCSVLogger

    cfg = compose_cfg(tmp_path, ["logger=csv", "logger.csv.name=mine"])
    assert cfg.logger.csv._target_ == "pytorch_lightning.loggers.CSVLogger"  # as conf/logger/csv.yaml names it
    (logger,) = builders.build_loggers(cfg, tmp_path)
    assert type(logger) is AtomicCSVLogger and logger.name == "mine" and logger.save_dir == str(tmp_path)
    logger.log_metrics({"val/acc": 0.5}, step=0)
    logger.save()
    assert _rows(tmp_path / "mine" / "metrics.csv")[0]["val/acc"] == "0.5"
