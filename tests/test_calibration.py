"""Calibration: ECE / NLL / Brier, temperature scaling at the end of training and after the fact, the
temperature used by eval, predict and export; the metrics imbalanced data needs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the functions
def test_fitted_temperature_recovers_the_overconfidence_of_scaled_logits():
    """Labels drawn from softmax(z); the model says 3z (over-confident): T is ~3 and the NLL falls to the truth's."""
    from visionsweep.models.calibration import fit_temperature, scores

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 5, generator=g) * 1.5
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    t = fit_temperature(3 * z, y)
    assert 2.6 < t < 3.4, t
    before, after, truth = scores(3 * z, y), scores(3 * z, y, temperature=t), scores(z, y)
    assert after["nll"] < before["nll"] - 0.1 and after["nll"] == pytest.approx(truth["nll"], abs=0.02)
    assert after["ece"] < before["ece"] / 2
    assert after["acc"] == before["acc"]  # dividing by T > 0 keeps every argmax


def test_ece_is_the_count_weighted_gap_of_the_reliability_bins():
    from visionsweep.models.calibration import reliability, scores

    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(500, 4, generator=g) * 2, torch.randint(0, 4, (500,), generator=g)
    bins = reliability(logits.softmax(1), y)
    by_hand = sum(n * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]) if n) / 500
    assert sum(bins["count"]) == 500 and len(bins["count"]) == 15
    assert scores(logits, y)["ece"] == pytest.approx(by_hand, abs=1e-6)


def test_a_saturated_confidence_has_its_own_slot_as_in_torchmetrics_ece():
    """Softmax in float32 reaches exactly 1: torchmetrics bins it apart, and so do the reliability bins."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    from visionsweep.models.calibration import reliability
    from visionsweep.report.calibration import ece

    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.95, 0.05], [0.95, 0.05]])
    y = torch.tensor([0, 1, 0, 0])
    bins = reliability(p, y)
    assert bins["at_one"] == {"count": 2, "accuracy": 0.5} and sum(bins["count"]) == 2
    expected = float(multiclass_calibration_error(p, y, num_classes=2, n_bins=15))
    assert ece(bins) == pytest.approx(expected, abs=1e-6) and expected == pytest.approx(0.275)
    g = torch.Generator().manual_seed(2)  # and a realistic mix of saturated and unsure rows
    logits = torch.randn(400, 5, generator=g) * torch.tensor([1.0, 40.0]).repeat(200)[:, None]
    y = torch.randint(0, 5, (400,), generator=g)
    probs = logits.softmax(1)
    assert reliability(probs, y)["at_one"]["count"] > 50
    assert ece(reliability(probs, y)) == pytest.approx(float(multiclass_calibration_error(probs, y, 5, 15)), abs=1e-5)


def test_calibrating_a_calibrated_model_scores_before_at_its_old_temperature():
    from types import SimpleNamespace

    from visionsweep.models.calibration import calibrate, scores

    g = torch.Generator().manual_seed(4)
    z = torch.randn(2000, 4, generator=g)
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    model = SimpleNamespace(temperature=torch.tensor(2.0))  # an earlier calibration stored T = 2
    out = calibrate(model, (3 * z, y), (3 * z, y), "val")
    assert out["nll_before"] == pytest.approx(scores(3 * z, y, temperature=2.0)["nll"], abs=1e-6)
    assert float(model.temperature) == pytest.approx(out["temperature"]) and 2.6 < out["temperature"] < 3.4


def test_brier_is_zero_when_sure_and_right_and_two_when_sure_and_wrong():
    from visionsweep.models.calibration import brier

    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    assert brier(p, torch.tensor([0, 0, 0])).tolist() == pytest.approx([0.0, 2.0, 0.5])


# --------------------------------------------------------------------------- a run, calibrated at its end
EPOCHS, VAL_EVERY = 40, 10  # the checkpoint follows train/loss: validating every epoch would only cost time


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, digits_root) -> tuple[Path, dict]:
    """Over-confident on purpose: 3 training digits per class learnt by heart (40 epochs, no label smoothing, no
    weight decay or schedule, the last epoch kept), 72 % on test; calibrate=true."""
    from visionsweep.train import train

    out = tmp_path_factory.mktemp("calibrated")
    metrics = train(compose_cfg(out, [*FAST, "data=digits", f"data.root={digits_root}", "data.train_per_class=3",
                                      "model.label_smoothing=0", "optimizer.weight_decay=0", "scheduler=none",
                                      "callbacks.model_checkpoint.monitor=train/loss",
                                      "callbacks.model_checkpoint.mode=min", f"trainer.max_epochs={EPOCHS}",
                                      f"trainer.check_val_every_n_epoch={VAL_EVERY}",
                                      "calibrate=true", "seed=3"]))
    return out, metrics


def _uncalibrated_copy(run: Path, tmp: Path) -> Path:
    """The best checkpoint with T put back to 1: the same weights, as the run was before calibrating."""
    from visionsweep import checkpoints

    record = json.loads((run / "run.json").read_text())
    ck = checkpoints.read(record["best_checkpoint"])
    ck["state_dict"]["temperature"] = torch.ones(())
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "splits"):  # what eval and calibrate rebuild the data from
        src = run / name
        (tmp / "run" / name).symlink_to(src, target_is_directory=src.is_dir())
    path = tmp / "run" / "checkpoints" / "plain.ckpt"
    torch.save(ck, path)
    return path


def test_temperature_scaling_lowers_nll_and_ece_on_test_and_the_checkpoint_keeps_t(calibrated):
    from visionsweep import checkpoints

    run, metrics = calibrated
    record = json.loads((run / "run.json").read_text())
    cal = record["calibration"]
    print(f"T={cal['temperature']:.3f}  ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}  "
          f"NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}  test/acc {metrics['test/acc']:.3f}")
    assert cal["fitted_on"] == "val" and cal["measured_on"] == "test"
    assert cal["temperature"] > 1.0  # trained to overfit without smoothing: too sure of itself
    assert cal["nll_after"] < cal["nll_before"] - 0.02 and cal["ece_after"] < cal["ece_before"]
    # the test pass ran with T: its metrics are the "after" figures, and run.json's reliability bins too
    assert metrics["test/nll"] == pytest.approx(cal["nll_after"], abs=1e-4)
    assert metrics["test/ece"] == pytest.approx(cal["ece_after"], abs=1e-4)
    bins = record["reliability"]
    assert bins["split"] == "test" and sum(bins["count"]) == sum(bins["before"]["count"]) > 100
    loaded = checkpoints.load(record["best_checkpoint"], kind="classifier").model
    assert float(loaded.temperature) == pytest.approx(cal["temperature"], abs=1e-5)
    assert metrics["test/acc"] > 0.4  # ten classes: chance is 0.1


def test_another_checkpoint_of_a_calibrated_run_warns_and_names_the_calibrated_one(calibrated, tmp_path, caplog):
    """last.ckpt (keep_last=true, or ckpt_path=latest) has no temperature: loading it says which file has one."""
    import logging
    import shutil

    from visionsweep import checkpoints

    run, _ = calibrated
    record = json.loads((run / "run.json").read_text())
    plain = _uncalibrated_copy(run, tmp_path)
    last = plain.rename(plain.with_name("last.ckpt"))
    shutil.copy(run / "run.json", last.parent.parent / "run.json")
    with caplog.at_level(logging.WARNING, logger="visionsweep.checkpoints"):
        checkpoints.load(record["best_checkpoint"])
        assert not caplog.records  # the calibrated checkpoint itself: nothing to say
        checkpoints.load(last)
    (message,) = [r.getMessage() for r in caplog.records]
    assert str(last) in message and f"ckpt_path={record['best_checkpoint']}" in message


def test_a_checkpoint_from_before_temperature_scaling_loads_with_t_1(calibrated, tmp_path):
    from visionsweep import checkpoints

    run, _ = calibrated
    ck = checkpoints.read(json.loads((run / "run.json").read_text())["best_checkpoint"])
    del ck["state_dict"]["temperature"]
    torch.save(ck, tmp_path / "old.ckpt")
    model = checkpoints.load(tmp_path / "old.ckpt", kind="classifier").model
    assert float(model.temperature) == 1.0
    logits = torch.tensor([[2.0, 0.0, -1.0] + [0.0] * 7])
    torch.testing.assert_close(model.probabilities(logits), logits.softmax(1))


def test_eval_of_the_calibrated_checkpoint_has_the_same_accuracy_and_a_lower_nll(calibrated, tmp_path):
    from visionsweep.eval import evaluate

    run, _ = calibrated
    plain = _uncalibrated_copy(run, tmp_path)
    best = json.loads((run / "run.json").read_text())["best_checkpoint"]
    before = evaluate(compose_cfg(tmp_path / "e1", [f"ckpt_path={plain}"], config_name="eval"))
    after = evaluate(compose_cfg(tmp_path / "e2", [f"ckpt_path={best}"], config_name="eval"))
    assert after["test/acc"] == before["test/acc"]
    assert after["test/nll"] < before["test/nll"] - 0.02


def test_calibrate_after_the_fact_finds_the_same_t_and_leaves_its_input_alone(calibrated, tmp_path):
    from visionsweep.calibrate import calibrate

    run, _ = calibrated
    plain = _uncalibrated_copy(run, tmp_path)
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()
    out = tmp_path / "cal"
    result = calibrate(compose_cfg(out, [f"ckpt_path={plain}"], config_name="calibrate"))
    at_train = json.loads((run / "run.json").read_text())["calibration"]
    assert result["temperature"] == pytest.approx(at_train["temperature"], rel=1e-3)
    assert hashlib.sha256(plain.read_bytes()).hexdigest() == digest  # never its own input
    written = json.loads((out / "calibration.json").read_text())
    assert written["nll_after"] < written["nll_before"] and (out / "plain.calibrated.ckpt").is_file()
    assert (out / "reliability.png").stat().st_size > 5000


def test_predict_and_exported_onnx_probabilities_are_the_softmax_of_logits_over_t(calibrated, digits_root, tmp_path):
    """predict of the calibrated checkpoint = softmax(log p / T) of the same weights' T = 1 predictions; the ONNX
    export with softmax=true = softmax(logits / T) of the checkpoint's forward."""
    import csv

    import numpy as np
    import onnxruntime as ort

    from visionsweep import checkpoints
    from visionsweep.export import export
    from visionsweep.predict import predict

    run, _ = calibrated
    best = json.loads((run / "run.json").read_text())["best_checkpoint"]
    model = checkpoints.load(best, kind="classifier").model
    t = float(model.temperature)
    assert abs(t - 1) > 0.05
    folder = tmp_path / "imgs" / "3"
    folder.mkdir(parents=True)
    for p in sorted((digits_root / "3").glob("*.png"))[:6]:
        (folder / p.name).write_bytes(p.read_bytes())

    def probs(ckpt: Path, name: str) -> np.ndarray:
        predict(compose_cfg(tmp_path / name, [f"ckpt_path={ckpt}", f"input={folder.parent}"], config_name="predict"))
        rows = sorted(csv.DictReader((tmp_path / name / "predictions.csv").open()), key=lambda r: r["path"])
        return np.array([[float(r[f"prob_{c}"]) for c in range(10)] for r in rows])

    calibrated_p, plain_p = probs(Path(best), "p_t"), probs(_uncalibrated_copy(run, tmp_path), "p_1")
    expected = torch.from_numpy(np.log(np.clip(plain_p, 1e-30, None)) / t).softmax(1).numpy()
    np.testing.assert_allclose(calibrated_p, expected, atol=1e-4)
    assert np.abs(calibrated_p - plain_p).max() > 1e-3  # T really changed them

    info = export(compose_cfg(tmp_path / "x", [f"ckpt_path={best}", "format=onnx", "softmax=true"],
                              config_name="export"))
    side = json.loads(Path(info["path"]).with_suffix(".json").read_text())
    assert side["output"]["temperature"] == pytest.approx(t, abs=1e-5)
    x = torch.randint(0, 256, (5, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    onnx_p = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(onnx_p, (model(x) / t).softmax(1).numpy(), atol=1e-5)


def test_cost_is_recorded_and_logged_and_val_metrics_have_a_wall_clock(calibrated):
    run, _ = calibrated
    record = json.loads((run / "run.json").read_text())
    cost = record["cost"]
    assert cost["params"] == record["params"]["total"] > 1e6 and cost["macs"] > 1e6
    assert cost["latency_ms"] > 0 and cost["throughput_img_s"] > 0 and cost["peak_mem_mb"] > 50
    assert cost["train_s"] == pytest.approx(record["fit_seconds"], abs=0.01) and cost["device_hours"] > 0
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"cost/latency_ms", "cost/params", "cost/macs"} <= set(header)
    elapsed = record["perf"]["val_elapsed_s"]
    assert [e for e, _ in elapsed] == list(range(VAL_EVERY - 1, EPOCHS, VAL_EVERY)) and all(a < b for (_, a), (_, b) in zip(elapsed, elapsed[1:]))
    assert elapsed[-1][1] <= record["fit_seconds"] + 0.5


def test_calibrate_refuses_a_multilabel_run_in_one_line(tmp_path):
    from visionsweep.run_config import check_config
    from visionsweep.errors import ConfigError

    cfg = compose_cfg(tmp_path, ["task=multilabel", "calibrate=true"])
    with pytest.raises(ConfigError, match="calibrate=true .* task=multilabel"):
        check_config(cfg)


# --------------------------------------------------------------------------- imbalanced data
def test_a_model_that_ignores_the_small_class_scores_high_accuracy_and_low_macro_f1(tmp_path):
    """90/10 folder, a classifier whose head always says the big class: accuracy 0.9, macro-F1 ~0.47,
    balanced accuracy 0.5, recall 0 for the small class."""
    import pytorch_lightning as pl

    from visionsweep.data.builtin import write_shapes
    from visionsweep.data.folder import FolderDataModule
    from visionsweep.models.classifier import ClassifierModule

    root = write_shapes(tmp_path / "shapes", n_per_class=90, size=32, seed=0)
    for extra in sorted((root / "square").glob("*.png"))[10:]:  # circle 90, square 10
        extra.unlink()
    for p in (root / "triangle").glob("*.png"):
        p.unlink()
    (root / "triangle").rmdir()
    dm = FolderDataModule(root=str(root), image_size=32, val_fraction=0.2, test_fraction=0.5, batch_size=50,
                          num_workers=0, cache="none")
    model = ClassifierModule("resnet10t", 2, class_names=["circle", "square"], image_size=32)
    with torch.no_grad():
        model.net.fc.weight.zero_()
        model.net.fc.bias.copy_(torch.tensor([5.0, -5.0]))  # ignores the image: always "circle"
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(model, datamodule=dm, verbose=False)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    labels = [y for _, y in dm.test_samples]
    share = labels.count(0) / len(labels)  # circles: every answer right; squares: every one wrong
    assert 0.85 < share < 0.95 and m["test/acc"] == pytest.approx(share)
    assert m["test/acc_balanced"] == pytest.approx(0.5)
    assert m["test/f1_macro"] == pytest.approx((2 * share / (1 + share)) / 2, abs=1e-4)  # circle F1 ~0.95, square 0
    assert m["test/f1_macro"] < m["test/acc"] - 0.4
    assert m["test/recall/square"] == 0.0 and m["test/recall/circle"] == 1.0
