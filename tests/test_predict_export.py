"""predict (table + CSV, TTA) and export (ONNX / TorchScript round trip, state_dict) of a checkpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_cfg, run_cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, digits_root) -> Path:
    """A resnet18 trained for one epoch on the embedded digits (32 px)."""
    from visionsweep.train import train

    out = tmp_path_factory.mktemp("run")
    train(compose_cfg(out, [*FAST, "data=digits", f"data.root={digits_root}", "trainer.max_epochs=1",
                            "test=false", "seed=0"]))
    return out / "checkpoints" / "last.ckpt"


def _predict(tmp: Path, ckpt: Path, *extra: str) -> tuple[list[dict], Path]:
    from visionsweep.predict import predict

    rows = predict(compose_cfg(tmp, [f"ckpt_path={ckpt}", *extra], config_name="predict"))
    return rows, tmp / "predictions.csv"


def test_predict_folder_writes_one_row_per_image(ckpt, digits_root, tmp_path):
    rows, path = _predict(tmp_path, ckpt, f"input={digits_root}")
    table = list(csv.DictReader(path.open()))
    images = sorted(p for p in digits_root.rglob("*.png"))
    assert len(table) == len(rows) == len(images) > 1000
    assert list(table[0])[:4] == ["path", "predicted", "probability", "label"]
    classes = [str(d) for d in range(10)]
    for row in table:
        probs = [float(row[f"prob_{c}"]) for c in classes]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert row["predicted"] == classes[max(range(10), key=probs.__getitem__)]
    # over all ten classes (one class alone after one epoch varies with the CPU): chance is 0.1, a
    # 1-epoch model scores ~0.75 -- above 0.3 means the checkpoint's weights and preprocessing are used
    acc = sum(r["predicted"] == r["label"] for r in table) / len(table)
    assert acc > 0.3
    assert json.loads((tmp_path / "run.json").read_text())["n_images"] == len(images)


def _run_dir_with(ckpt: Path, tmp: Path, preset: str) -> Path:
    """A copy of the checkpoint in a run dir whose augmentation.json records ``preset``'s train pipeline."""
    import shutil

    from omegaconf import OmegaConf

    from visionsweep import augment

    conf = Path(__file__).resolve().parents[1] / "conf" / "augmentation" / f"{preset}.yaml"
    cfg = OmegaConf.merge({"data": {"image_size": 32}}, {"aug": OmegaConf.load(conf)})
    train_tf, eval_tf = augment.build_pipelines(cfg.aug, 32)
    augment.save_pipelines(train_tf, eval_tf, tmp / preset / "augmentation.json")
    (tmp / preset / "checkpoints").mkdir()
    return Path(shutil.copy(ckpt, tmp / preset / "checkpoints" / "last.ckpt"))


def test_tta_views_follow_the_training_pipeline(ckpt, digits_root, tmp_path):
    """No flipped view unless training flipped; no zoomed crops unless it cropped or rescaled."""
    from visionsweep import checkpoints
    from visionsweep.inference import CROPS, predict_images

    image = next((digits_root / "7").glob("*.png"))   # a 7 is not left-right symmetric
    plain, _ = _predict(tmp_path / "plain", ckpt, f"input={image}")
    # ckpt was trained with augmentation=none: TTA has nothing to add but the eval view
    tta, _ = _predict(tmp_path / "none", ckpt, f"input={image}", "tta=true")
    assert json.loads((tmp_path / "none" / "run.json").read_text())["tta_views"] == ["eval"]
    assert tta[0]["probability"] == plain[0]["probability"]
    model = checkpoints.load(ckpt, kind="classifier").model
    flipped_too = predict_images(model, [image], tta=True)   # every view, flips included
    for preset, flips in (("light", False), ("basic", True)):
        rows, _ = _predict(tmp_path / f"p_{preset}", _run_dir_with(ckpt, tmp_path, preset), f"input={image}",
                           "tta=true")
        run = json.loads((tmp_path / f"p_{preset}" / "run.json").read_text())
        views = ["eval", *CROPS]
        assert run["tta_views"] == views + ([f"hflip({v})" for v in views] if flips else []), preset
        # light: scale 0.9-1.1, so crops of the image resized 1.1x; basic: RandomResizedCrop, 1.15x
        assert run["tta_zoom"] == pytest.approx(1.15 if flips else 1.1)
        probs = [v for k, v in rows[0].items() if k.startswith("prob_")]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        expected = predict_images(model, [image], tta=True, views=run["tta_views"], zoom=run["tta_zoom"])[0]
        assert probs == pytest.approx(expected.tolist(), abs=1e-5)
        if not flips:   # the flip views, had they been averaged in, change the answer
            assert (expected - flipped_too[0]).abs().max() > 1e-4


def test_tta_views_of_each_preset():
    from omegaconf import OmegaConf

    from visionsweep import augment
    from visionsweep.inference import tta_views

    conf = Path(__file__).resolve().parents[1] / "conf" / "augmentation"
    got = {}
    for preset in ("none", "light", "basic", "strong"):
        cfg = OmegaConf.merge({"data": {"image_size": 32}}, {"aug": OmegaConf.load(conf / f"{preset}.yaml")})
        views, zoom = tta_views(augment.pipeline_to_dict(augment.build_pipelines(cfg.aug, 32)[0]))
        got[preset] = (len(views), any(v.startswith("hflip") for v in views), zoom)
    assert got == {"none": (1, False, 1.0), "light": (6, False, pytest.approx(1.1)),
                   "basic": (12, True, 1.15), "strong": (12, True, 1.15)}
    assert tta_views(None) == (["eval"], 1.0)   # nothing recorded: nothing justifies more


@pytest.mark.slow  # a Python process per case: the in-process tests cover the messages
def test_predict_cli_reports_a_bad_input_in_one_line(ckpt, tmp_path):
    res = run_cli("predict", f"ckpt_path={ckpt}", f"input={tmp_path / 'nope'}",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: input") and "nope" in res.stderr


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_round_trip(ckpt, tmp_path, fmt):
    from visionsweep import checkpoints
    from visionsweep.export import export

    info = export(compose_cfg(tmp_path, [f"ckpt_path={ckpt}", f"format={fmt}"], config_name="export"))
    path = Path(info["path"])
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["class_names"] == [str(d) for d in range(10)] and side["input"]["dtype"] == "uint8"
    assert side["input"]["shape"] == ["N", 3, 32, 32] and side["preprocessing"]["center_crop"] == 32
    assert info["max_abs_diff"] <= 1e-4
    # independent check: a batch size the export never saw, against the checkpoint's own forward
    model = checkpoints.load(ckpt, kind="classifier").model
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        ref = model(x)
        if fmt == "onnx":
            import onnxruntime as ort

            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
        else:
            got = torch.jit.load(str(path))(x)
    assert (got - ref).abs().max() <= 1e-4


def test_export_state_dict_is_a_pretrained_file(ckpt, tmp_path):
    from visionsweep import checkpoints
    from visionsweep.export import export
    from visionsweep.models.classifier import ClassifierModule

    out = tmp_path / "w.safetensors"
    export(compose_cfg(tmp_path, [f"ckpt_path={ckpt}", "format=state_dict", f"output={out}"],
                       config_name="export"))
    trained = checkpoints.load(ckpt, kind="classifier").model
    fresh = ClassifierModule("resnet18", 5, pretrained_file=str(out), image_size=32)
    assert torch.equal(fresh.net.layer3[0].conv1.weight, trained.net.layer3[0].conv1.weight)
    assert fresh.net.fc.out_features == 5
