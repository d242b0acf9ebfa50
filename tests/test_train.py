"""Training end to end on small data: it learns, writes its run dir, evaluates, resumes, repeats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_cfg


def _train(tmp: Path, root: Path, *extra: str, data: str = "shapes") -> dict:
    from visionsweep.train import train

    cfg = compose_cfg(tmp, [*FAST, f"data={data}", f"data.root={root}", *extra])
    return train(cfg)


@pytest.fixture(scope="module")
def trained(digits_run) -> tuple[Path, dict]:
    """The shared short training run (conftest.digits_run: resnet10t, digits at 32 px, 2 epochs)."""
    return digits_run


def test_training_learns_above_chance(trained):
    _, metrics = trained
    # 10 balanced classes: chance is 0.1
    assert metrics["val/acc_best"] >= 0.8, metrics
    assert metrics["test/acc"] >= 0.8, metrics


def test_run_dir_has_config_metrics_checkpoints_and_run_json(trained):
    out, metrics = trained
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    for col in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc"):
        assert col in rows[0], col
    assert max(int(r["epoch"]) for r in rows if r["train/loss"]) == 1  # epochs 0 and 1
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert len(list((out / "checkpoints").glob("epoch_*.ckpt"))) == 1  # the best one
    assert (out / "config.yaml").is_file() and (out / "augmentation.json").is_file()
    assert (out / "splits" / "train.csv").is_file() and (out / "splits" / "test.csv").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "ok"
    assert run["metrics"]["test/acc"] == pytest.approx(metrics["test/acc"])
    assert set(run["git"]) == {"commit", "dirty"}
    assert run["versions"]["torch"] and run["versions"]["timm"]
    assert run["data"]["fingerprint"]["n_files"] == 1797 and len(run["data"]["fingerprint"]["sha256"]) == 64
    assert run["input"]["image_size"] == 32
    assert set(run["test_report"]["per_class"]) == {str(d) for d in range(10)}
    test_rows = (out / "splits" / "test.csv").read_text().strip().splitlines()[1:]
    assert sum(map(sum, run["test_report"]["confusion_matrix"])) == len(test_rows)
    assert run["best_checkpoint"].endswith(".ckpt") and run["train_images_per_s"] > 0


def test_a_single_run_draws_its_curves_and_its_test_confusion(trained):
    """plots=auto in a single run: plots/curves.png, loss | accuracy side by side, each with the train (C0,
    dashed) and val (C1) curves; plots/confusion.png of the test split."""
    import numpy as np
    from PIL import Image

    out, _ = trained
    with Image.open(out / "plots" / "curves.png") as img:
        rgb = np.asarray(img.convert("RGB")).astype(int)
    height, width, _ = rgb.shape
    assert width > 1.8 * height  # two panels
    for panel in (rgb[:, : width // 2], rgb[:, width // 2:]):
        for colour in ((31, 119, 180), (255, 127, 14)):  # matplotlib's C0 (train) and C1 (val)
            assert (np.abs(panel - colour).max(axis=2) <= 10).sum() > 30, colour
    with Image.open(out / "plots" / "confusion.png") as img:
        img.verify()
        assert img.size[0] > 300


def test_checkpoint_carries_what_predict_needs(trained):
    out, _ = trained
    hp = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hp["class_names"] == [str(d) for d in range(10)]
    assert hp["image_size"] == 32 and len(hp["mean"]) == 3 and len(hp["std"]) == 3


def test_eval_reproduces_test_accuracy(trained, tmp_path):
    from visionsweep.eval import evaluate

    out, metrics = trained
    run = json.loads((out / "run.json").read_text())
    cfg = compose_cfg(tmp_path / "eval", [f"ckpt_path={run['best_checkpoint']}"], config_name="eval")
    result = evaluate(cfg)
    assert result["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_resume_continues_epoch_count(trained, tmp_path, digits_root):
    out, _ = trained
    # more epochs than the run planned: only without a schedule planned for the run's length (the
    # one-cycle's refusal is in test_faults.py)
    _train(tmp_path, digits_root, "trainer.max_epochs=3", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
           "test=false", "scheduler=none", data="digits")
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    epochs = {int(r["epoch"]) for r in rows if r["train/loss"]}
    assert epochs == {2}  # only the one new epoch was trained
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["epochs"] == 3 and run["resumed_from"].endswith("last.ckpt")
    # the resumed run re-used the original split
    assert (tmp_path / "splits" / "val.csv").read_text() == (out / "splits" / "val.csv").read_text()


def test_same_config_and_seed_give_identical_metrics(tmp_path, shapes_root):
    args = ["trainer.max_epochs=1", "seed=3", "test=false", "augmentation=light"]
    a = _train(tmp_path / "a", shapes_root, *args)
    b = _train(tmp_path / "b", shapes_root, *args)
    assert a["val/loss"] == b["val/loss"] and a["val/acc"] == b["val/acc"]
    c = _train(tmp_path / "c", shapes_root, *args[:-3], "seed=4", "test=false", "augmentation=light")
    assert c["val/loss"] != a["val/loss"]  # the seed matters


def test_wandb_offline_writes_a_run_folder_without_network(tmp_path, shapes_root, monkeypatch):
    import socket

    real_connect = socket.socket.connect

    def local_only(self, address):  # wandb talks to its own service process over loopback only
        host = address[0] if isinstance(address, tuple) else ""
        if isinstance(address, tuple) and host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"network access to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    _train(tmp_path, shapes_root, "logger=wandb", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
           "test=false")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (tmp_path / "metrics.csv").is_file()  # CSV is always there, even with logger=wandb
    assert json.loads((tmp_path / "run.json").read_text())["wandb_id"]


def test_digits_default_size_is_resolved_before_the_config_tree_is_printed(tmp_path, digits_root, capsys):
    """data.image_size=auto (the digits default) is printed, saved and trained as the backbone's smallest side."""
    from visionsweep.train import train

    cfg = compose_cfg(tmp_path, ["model=resnet18", "data=digits", f"data.root={digits_root}", "logger=csv",
                                 "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
                                 "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"])
    assert cfg.data.image_size == "auto"
    train(cfg)
    tree = capsys.readouterr().out
    assert "image_size: 16" in tree and "image_size: auto" not in tree
    assert "image_size: 16" in (tmp_path / "config.yaml").read_text()
    hp = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hp["image_size"] == 16
