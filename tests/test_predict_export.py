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


def test_predict_single_image_with_tta(ckpt, digits_root, tmp_path):
    image = next((digits_root / "7").glob("*.png"))
    plain, _ = _predict(tmp_path / "plain", ckpt, f"input={image}")
    tta, path = _predict(tmp_path / "tta", ckpt, f"input={image}", "tta=true")
    assert len(tta) == 1 and tta[0]["path"] == str(image)
    probs = [v for k, v in tta[0].items() if k.startswith("prob_")]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert tta[0]["probability"] != plain[0]["probability"]  # other views were averaged in


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
