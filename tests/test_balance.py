"""Imbalanced classes: class counts, loss weights, the seeded weighted sampler, and the metrics that see a
small class that plain accuracy hides (macro-F1, balanced accuracy) with the warning that names them."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lopsided(tmp_path_factory) -> Path:
    """90 images of ``big`` and 10 of ``small`` (8 px, distinct colours: the classes are easy to tell apart)."""
    root = tmp_path_factory.mktemp("lopsided")
    rng = np.random.default_rng(0)
    for cls, n, colour in (("big", 90, (200, 40, 40)), ("small", 10, (40, 40, 200))):
        (root / cls).mkdir()
        for i in range(n):
            pixels = np.clip(np.array(colour) + rng.normal(0, 10, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:03d}.png")
    return root


def _dm(root: Path, **kwargs):
    from visionsweep.data.folder import FolderDataModule

    kwargs.setdefault("num_workers", 0)
    return FolderDataModule(root=str(root), image_size=8, batch_size=8, val_fraction=0.2, **kwargs)


def _epoch_labels(dm, seed: int) -> list[int]:
    torch.manual_seed(seed)  # what seed_everything fixes; the sampler draws from it when the epoch starts
    return [int(y) for _, labels in dm.train_dataloader() for y in labels]


def test_class_counts_are_logged_per_split_and_loss_weights_are_inverse_frequency(lopsided):
    dm = _dm(lopsided, balance="weights")
    lines = dm.class_count_lines()
    assert lines[0] == "train (80 images; images per class): big 72, small 8", lines
    assert lines[1] == "val (20 images; images per class): big 18, small 2", lines
    assert dm.train_imbalance() == 9.0
    # scikit-learn's "balanced" rule, by hand: n / (classes * n_c) = 80 / (2 * 72) and 80 / (2 * 8)
    assert dm.loss_weights() == pytest.approx([80 / 144, 5.0])
    assert _dm(lopsided).loss_weights() is None  # balance=none: plain loss


def test_the_sampler_draws_the_small_class_as_often_and_repeats_with_the_seed(lopsided):
    plain, balanced = _dm(lopsided), _dm(lopsided, balance="sampler")
    drawn = _epoch_labels(balanced, 0)
    assert len(drawn) == 80  # an epoch is as long as before
    small = Counter(drawn)[1] / len(drawn)
    assert 0.3 < small < 0.7, drawn  # ~ half, against 8 / 80 = 0.1 when shuffled
    assert Counter(_epoch_labels(plain, 0))[1] == 8
    assert drawn == _epoch_labels(balanced, 0)  # two identical runs draw the same samples
    assert drawn != _epoch_labels(balanced, 1)
    workers = _dm(lopsided, balance="sampler", num_workers=1, persistent_workers=False)
    assert _epoch_labels(workers, 0) == drawn  # the sampler runs in the main process: workers change nothing


def test_a_bad_balance_value_names_the_key_and_the_choices(lopsided):
    from visionsweep.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _dm(lopsided, balance="oversample")
    assert "data.balance" in str(err.value) and "sampler" in str(err.value) and "weights" in str(err.value)


class _AlwaysBig(torch.nn.Module):
    """A classifier head that ignores its input and always says class 0 (the large class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[4.0, -4.0]]).expand(len(x), 2)


def test_macro_f1_and_balanced_accuracy_expose_a_model_that_ignores_the_small_class(lopsided):
    import pytorch_lightning as pl

    from visionsweep.models.classifier import ClassifierModule

    dm = _dm(lopsided)
    model = ClassifierModule("resnet10t", num_classes=2, image_size=8)
    model.net = _AlwaysBig()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    got = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert got["val/acc"] == pytest.approx(0.9)  # 18 of 20 right: looks good
    assert got["val/acc_balanced"] == pytest.approx(0.5)  # mean recall: 1.0 and 0.0
    assert got["val/f1_macro"] < got["val/acc"] - 0.4  # F1 of big = 36 / 38, of small = 0: macro ~0.47


def test_imbalanced_classes_chosen_by_plain_accuracy_get_a_warning_naming_better_metrics(lopsided, tmp_path, caplog):
    from visionsweep import builders

    cfg = compose_cfg(tmp_path, [*FAST, f"data.root={lopsided}"])
    dm = _dm(lopsided)
    with caplog.at_level(logging.INFO, logger="visionsweep.builders"):
        builders.report_classes(cfg, dm)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "9.0:1" in warned[0] and "val/acc" in warned[0], warned
    assert "val/f1_macro" in warned[0] and "val/acc_balanced" in warned[0] and "data.balance" in warned[0]
    assert any("train (80 images" in r.getMessage() for r in caplog.records)
    caplog.clear()
    cfg.callbacks.model_checkpoint.monitor = "val/f1_macro"
    with caplog.at_level(logging.INFO, logger="visionsweep.builders"):
        builders.report_classes(cfg, dm)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_macro_f1_chooses_the_checkpoint_is_what_a_sweeper_gets_and_ranks_the_report(lopsided, tmp_path, caplog):
    """val/f1_macro as callbacks.model_checkpoint.monitor, optimized_metric and the report's --metric, on 90/10."""
    import csv

    from visionsweep.report import build_report
    from visionsweep.train import train

    run = tmp_path / "run"
    cfg = compose_cfg(run, [*FAST, "data=folder", f"data.root={lopsided}", "data.image_size=16", "seed=2",
                            "trainer.max_epochs=3", "scheduler=none", "callbacks.model_checkpoint.monitor=val/f1_macro",
                            "optimized_metric=val/f1_macro", "cost.enabled=false"])
    with caplog.at_level(logging.WARNING):
        metrics = train(cfg)
    assert not [r for r in caplog.records if "imbalanced" in r.getMessage() or "3:1" in r.getMessage()]
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/f1_macro")]
    f1 = {int(r["epoch"]): float(r["val/f1_macro"]) for r in rows}
    assert len(f1) == 3 and 0.0 <= min(f1.values()) and max(f1.values()) <= 1.0
    best = json.loads((run / "run.json").read_text())["best_checkpoint"]
    assert Path(best).name == f"epoch_{max(f1, key=f1.get):03d}.ckpt"  # the epoch of the highest macro-F1
    assert metrics["val/f1_macro"] == pytest.approx(f1[2], abs=1e-6)  # _hydra_main returns metrics[optimized_metric]
    result = build_report([run], tmp_path / "report", "val/f1_macro")
    (row,) = result["rows"]
    assert result["metric"] == "val/f1_macro" and row["val/f1_macro mean"] == pytest.approx(f1[2], abs=1e-5)


@pytest.mark.scaling  # three short training runs (in process)
def test_a_resumed_run_with_the_sampler_equals_the_uninterrupted_run(lopsided, tmp_path):
    from visionsweep.train import train

    # scheduler=none: no plan tied to the run's length, so a 1-epoch run may be continued to 3 epochs
    common = [*FAST, "data=folder", f"data.root={lopsided}", "data.image_size=16", "data.balance=sampler", "data.batch_size=16",
              "seed=3", "scheduler=none", "callbacks.model_checkpoint.last_every_s=0"]
    full = train(compose_cfg(tmp_path / "full", [*common, "trainer.max_epochs=3"]))
    train(compose_cfg(tmp_path / "first", [*common, "trainer.max_epochs=1"]))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    resumed = train(compose_cfg(tmp_path / "resumed", [*common, "trainer.max_epochs=3", f"ckpt_path={last}"]))
    for key in ("val/acc", "val/loss", "train/loss"):
        assert resumed[key] == full[key], key
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["resumed_from"] == str(last)
