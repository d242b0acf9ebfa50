"""task=multilabel: learning on the generated shapes_multi set (against image-blind baselines), thresholds tuned
for F1 and kept in the checkpoint, predict's CSV, eval from the run's own split files, ONNX export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
MULTI = [*FAST, "task=multilabel", "data=shapes_multi", "model=resnet10t", "data.image_size=64", "trainer.max_epochs=8",
         "seed=1"]


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory) -> tuple[Path, dict, Path]:
    """A multi-label run on 900 generated images (0-3 shapes each), 8 epochs (~40 s: the tests that use it are
    in make test-scaling; 300 images learn too little to tell from chance reliably). Returns (run dir, metrics,
    data root)."""
    from visionsweep.data.builtin import write_shapes_multi
    from visionsweep.train import train

    base = tmp_path_factory.mktemp("multi")
    root = write_shapes_multi(base / "shapes_multi", n_images=900, seed=1)
    out = base / "run"
    metrics = train(compose_cfg(out, [*MULTI, f"data.root={root}"]))
    return out, metrics, root


def _best(run: Path) -> Path:
    return Path(json.loads((run / "run.json").read_text())["best_checkpoint"])


@pytest.mark.scaling  # the shared 40 s multi-label run
def test_multilabel_training_beats_the_image_blind_baselines(multi_run):
    run, metrics, _ = multi_run
    record = json.loads((run / "run.json").read_text())
    floor = record["baselines"]
    assert floor["split"] == "test"
    blind_map = max(floor["all_negative"]["map"], floor["always_frequent"]["map"])
    blind_f1 = max(floor["all_negative"]["f1_macro"], floor["always_frequent"]["f1_macro"])
    assert 0.3 < blind_map < 0.7  # each shape is in about half the images: constant scores rank nothing
    assert metrics["test/map"] > blind_map + 0.25, (metrics, floor)
    assert metrics["test/f1_macro"] > blind_f1 + 0.3, (metrics, floor)
    assert metrics["val/map_best"] >= metrics["val/map"] - 1e-9
    per_class = record["test_report"]["per_class"]
    assert set(per_class) == {"circle", "square", "triangle"}
    for name, row in per_class.items():  # each class's 2 x 2 counts cover the test split once
        assert sum(map(sum, row["confusion"])) == 180, name
        assert row["support"] == row["confusion"][1][0] + row["confusion"][1][1]


@pytest.mark.scaling  # the shared 40 s multi-label run
def test_tuned_thresholds_are_kept_in_the_checkpoint_and_predict_applies_them(multi_run, tmp_path):
    from visionsweep.predict import predict

    run, _, root = multi_run
    state = torch.load(_best(run), map_location="cpu", weights_only=True)["state_dict"]
    thresholds = state["thresholds"].tolist()
    assert len(thresholds) == 3 and all(0.0 < t < 1.0 for t in thresholds)
    assert thresholds != [0.5, 0.5, 0.5]  # tuned, not the default
    cfg = compose_cfg(tmp_path, [f"ckpt_path={_best(run)}", f"input={root / 'images'}"], config_name="predict")
    predict(cfg)
    with (tmp_path / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 900
    assert list(rows[0]) == ["path", "predicted", "n_predicted", "prob_circle", "prob_square", "prob_triangle"]
    truth = {r["path"]: set(r["labels"].split()) for r in csv.DictReader((root / "labels.csv").open())}
    right = 0
    for row in rows:
        chosen = {c for c, t in zip(("circle", "square", "triangle"), thresholds) if float(row[f"prob_{c}"]) >= t}
        assert set(filter(None, row["predicted"].split("|"))) == chosen
        assert int(row["n_predicted"]) == len(chosen)
        right += chosen == truth[Path(row["path"]).relative_to(root).as_posix()]
    assert right / len(rows) > 0.4  # exact label sets: 1/8 by chance (three coin-flip classes)


def test_tuned_thresholds_beat_one_half_on_macro_f1_with_a_rare_class():
    from visionsweep.models.multilabel import f1_scores, tune_thresholds

    # an under-confident model: a rare class (5 %) whose positives score ~0.3 and negatives ~0.1, and a
    # common class scored well; thresholds tuned on one half of the samples, judged on the other
    g = torch.Generator().manual_seed(0)
    n = 4000
    targets = torch.stack([torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.05], 1).float()
    noise = torch.randn(n, 2, generator=g) * 0.05
    probs = (torch.where(targets.bool(), torch.tensor([0.8, 0.3]), torch.tensor([0.2, 0.1])) + noise).clamp(0, 1)
    tuned = tune_thresholds(probs[: n // 2], targets[: n // 2])
    assert 0.1 < float(tuned[1]) < 0.3  # between the rare class's negatives and positives
    f1_tuned, _ = f1_scores(probs[n // 2:], targets[n // 2:], tuned)
    f1_half, _ = f1_scores(probs[n // 2:], targets[n // 2:], 0.5)
    assert f1_half[1] < 0.1 and f1_tuned[1] > 0.75  # at 0.5 the rare class is never found
    assert sum(f1_tuned) / 2 > sum(f1_half) / 2 + 0.3
    # a class without positives keeps the default
    assert tune_thresholds(probs, torch.zeros_like(targets)).tolist() == [0.5, 0.5]


@pytest.mark.scaling  # the shared 40 s multi-label run
def test_eval_rebuilds_the_multilabel_split_from_the_run_and_gets_its_test_scores(multi_run, tmp_path):
    from visionsweep.eval import evaluate

    run, metrics, _ = multi_run
    cfg = compose_cfg(tmp_path, [f"ckpt_path={_best(run)}"], config_name="eval")
    got = evaluate(cfg)
    for key in ("test/map", "test/f1_macro", "test/f1_micro"):
        assert got[key] == pytest.approx(metrics[key], abs=1e-6), key


@pytest.mark.scaling  # the shared 40 s multi-label run
def test_labels_from_a_table_need_the_multilabel_task_and_the_task_needs_a_table(multi_run, tmp_path):
    from visionsweep.errors import ConfigError
    from visionsweep.train import train

    _, _, root = multi_run
    table = [*FAST, "data=table", f"data.root={root}", "data.file=labels.csv", "data.label_col=labels",
             "data.label_sep=' '"]
    with pytest.raises(ConfigError, match="task=multilabel"):
        train(compose_cfg(tmp_path / "a", table))
    with pytest.raises(ConfigError, match="data=table"):
        train(compose_cfg(tmp_path / "b", [*FAST, "task=multilabel", "data=shapes"]))


@pytest.mark.scaling  # ONNX export (~10 s)
def test_onnx_export_with_softmax_applies_the_sigmoid_like_predict(multi_run, tmp_path):
    import onnxruntime as ort

    from visionsweep.checkpoints import load
    from visionsweep.data.images import load_rgb
    from visionsweep.export import export
    from visionsweep.inference import predict_images

    run, _, root = multi_run
    cfg = compose_cfg(tmp_path, [f"ckpt_path={_best(run)}", "softmax=true"], config_name="export")
    info = export(cfg)
    onnx_file = Path(info["path"])
    assert info["output"]["multilabel"] is True and len(info["output"]["thresholds"]) == 3
    model = load(_best(run)).model
    paths = sorted((root / "images").glob("*.png"))[:8]
    want = predict_images(model, paths)  # the images are 64 px, the model's size: no resize on either side
    x = torch.stack([torch.from_numpy(load_rgb(p)).permute(2, 0, 1) for p in paths]).numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.astype(info["input"]["dtype"])})[0]
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4)
    assert not torch.allclose(want.sum(1), torch.ones(8), atol=0.05)  # sigmoids, not a softmax


def test_bce_and_asl_fall_as_the_logits_agree_with_the_labels_and_bad_losses_are_named():
    from visionsweep.errors import ConfigError
    from visionsweep.models.multilabel import check_loss, multilabel_loss

    targets = (torch.rand(16, 4, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    right = (2 * targets - 1) * 4.0
    for kind in ("bce", "asl"):
        good, bad = multilabel_loss(kind, right, targets), multilabel_loss(kind, -right, targets)
        assert torch.isfinite(good) and 0 <= float(good) < float(bad), kind
    # the batch mean, not timm's batch sum: a larger batch of the same samples gives the same loss
    assert float(multilabel_loss("asl", right.repeat(2, 1), targets.repeat(2, 1))) == pytest.approx(
        float(multilabel_loss("asl", right, targets)))
    assert check_loss(None, True) == "bce" and check_loss(None, False) == "ce"
    with pytest.raises(ConfigError, match="task=multilabel"):
        check_loss("asl", False)
    with pytest.raises(ConfigError, match="bce, asl"):
        check_loss("focal", True)


@pytest.mark.scaling  # the shared multi-label run
def test_the_report_ranks_a_multilabel_run_by_val_map_and_tta_predicts_probabilities(multi_run, tmp_path):
    from visionsweep.checkpoints import load
    from visionsweep.inference import predict_images
    from visionsweep.report import build_report

    run, metrics, root = multi_run
    got = build_report([run], tmp_path / "report")
    assert got["metric"] == "val/map_best"  # chosen by itself: a multi-label run has no val/acc
    with (tmp_path / "report" / "summary.csv").open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["val/map_best mean"]) == pytest.approx(metrics["val/map_best"], abs=1e-6)
    model = load(_best(run)).model
    paths = sorted((root / "images").glob("*.png"))[:6]
    views = ["eval", "hflip(eval)"]
    probs = predict_images(model, paths, tta=True, views=views)
    assert probs.shape == (6, 3) and bool(((probs >= 0) & (probs <= 1)).all())
    assert not torch.allclose(probs.sum(1), torch.ones(6), atol=0.05)  # averaged sigmoids, not softmaxes
