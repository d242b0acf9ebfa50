"""predict (table + CSV, TTA) and export (ONNX / TorchScript round trip, state_dict) of a checkpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_cfg, run_cli


@pytest.fixture(scope="module")
def ckpt(digits_run) -> Path:
    """The last.ckpt of the shared short run (conftest.digits_run: resnet10t, digits at 32 px, 2 epochs)."""
    return digits_run[0] / "checkpoints" / "last.ckpt"


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
    # the checkpoint's weights and eval preprocessing are used: on the run's own val split predict scores what
    # the training run measured there (val/acc of the epoch last.ckpt ends), give or take one image's rounding
    run_dir = ckpt.parent.parent
    val = {(digits_root / ln.split(",")[0]).resolve()
           for ln in (run_dir / "splits" / "val.csv").read_text().strip().splitlines()[1:]}
    on_val = [r for r in table if Path(r["path"]).resolve() in val]
    val_acc = sum(r["predicted"] == r["label"] for r in on_val) / len(on_val)
    recorded = json.loads((run_dir / "run.json").read_text())["metrics"]["val/acc"]
    acc = sum(r["predicted"] == r["label"] for r in table) / len(table)
    print(f"predict accuracy: {acc:.3f} over the {len(table)} digits, {val_acc:.4f} on the {len(on_val)} val "
          f"images (the run recorded val/acc {recorded:.4f})")
    assert len(on_val) == len(val) > 100 and val_acc == pytest.approx(recorded, abs=1.01 / len(on_val))
    # over all ten classes: chance is 0.1 (one epoch scored 0.48 on an AMD EPYC, 0.75 on an Intel; this run has two)
    assert acc > 0.3, acc
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


def _tta_views_seen(tmp_path: Path) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """predict_images on a 40 x 40 image with zoom 1.25 at 32 px, every view: what the model was fed, by name."""
    from PIL import Image

    from visionsweep.inference import CROPS, predict_images
    from visionsweep.models.classifier import ClassifierModule

    yy, xx = np.mgrid[0:40, 0:40]
    pixels = np.stack([xx * 6, yy * 6, (xx * 3 + yy * 3) % 256], axis=2).astype(np.uint8)  # 6 levels per pixel
    Image.fromarray(pixels).save(tmp_path / "grid.png")
    model = ClassifierModule("resnet10t", 3, image_size=32).eval()
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    views = ["eval", *CROPS, *(f"hflip({v})" for v in ["eval", *CROPS])]
    predict_images(model, [tmp_path / "grid.png"], tta=True, views=views, zoom=1.25)
    assert len(seen) == len(views) == 12
    return pixels, views, {v: x[0].permute(1, 2, 0).numpy().astype(int) for v, x in zip(views, seen)}


def _crops_by_hand(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The zoomed image is the image itself (resize 40 -> 40, centre crop 40 of 40): each crop is a slice."""
    return {"zoom_center": pixels[4:36, 4:36], "zoom_top_left": pixels[:32, :32],
            "zoom_top_right": pixels[:32, 8:], "zoom_bottom_left": pixels[8:, :32],
            "zoom_bottom_right": pixels[8:, 8:]}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    # one pixel off in either direction is 6 levels off everywhere; a resize's rounding is at most 1-2
    return a.shape == b.shape and np.abs(a - b.astype(int)).max() <= 2


def test_tta_crops_are_the_five_corners_and_centre_of_the_zoomed_image_and_their_flips(tmp_path):
    """The views predict_images averages, against crops computed by hand from the pixels (as a set)."""
    pixels, views, got = _tta_views_seen(tmp_path)
    crops = [v for v in views if v.startswith("zoom_")]
    for name, want in _crops_by_hand(pixels).items():
        assert sum(_same(got[v], want) for v in crops) == 1, name  # each hand-made crop is fed exactly once
    for v in ["eval", *crops]:
        np.testing.assert_array_equal(got[f"hflip({v})"], got[v][:, ::-1])
    # the eval view: resized to 32 / crop_pct and centre-cropped, neither a zoomed crop nor the whole image
    assert got["eval"].shape == (32, 32, 3) and not any(_same(got["eval"], got[v]) for v in crops)


def test_tta_crop_views_carry_the_names_of_their_crops(tmp_path):
    pixels, _, got = _tta_views_seen(tmp_path)
    for name, want in _crops_by_hand(pixels).items():
        assert _same(got[name], want), name


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
    if fmt == "onnx":  # the file was timed through onnxruntime, and its run.json says so
        cost = side["cost"]
        assert cost["onnx_latency_ms"] > 0 and cost["onnx_batch"] == 1 and cost["onnx_calls"] >= 5
        assert cost["onnx_throughput_img_s"] == pytest.approx(1000 / cost["onnx_latency_ms"], rel=0.01)
        assert json.loads((tmp_path / "run.json").read_text())["cost"] == cost
    else:
        assert "cost" not in side


def test_export_time_false_skips_the_timing(ckpt, tmp_path):
    from visionsweep.export import export

    info = export(compose_cfg(tmp_path, [f"ckpt_path={ckpt}", "time=false", "check=false"], config_name="export"))
    assert "cost" not in info and "cost" not in json.loads(Path(info["path"]).with_suffix(".json").read_text())


def test_an_onnx_file_that_cannot_be_timed_is_still_exported_with_its_sidecar(ckpt, tmp_path, monkeypatch, caplog):
    import logging
    import sys

    from visionsweep.export import export

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as when onnxruntime is not installed
    with caplog.at_level(logging.WARNING):
        info = export(compose_cfg(tmp_path, [f"ckpt_path={ckpt}", "check=false"], config_name="export"))
    path = Path(info["path"])
    assert path.is_file() and "cost" not in json.loads(path.with_suffix(".json").read_text())
    assert any("not timed" in r.getMessage() and "onnxruntime" in r.getMessage() for r in caplog.records)


def test_export_state_dict_is_a_pretrained_file(ckpt, tmp_path):
    from visionsweep import checkpoints
    from visionsweep.export import export
    from visionsweep.models.classifier import ClassifierModule

    out = tmp_path / "w.safetensors"
    export(compose_cfg(tmp_path, [f"ckpt_path={ckpt}", "format=state_dict", f"output={out}"],
                       config_name="export"))
    trained = checkpoints.load(ckpt, kind="classifier").model
    fresh = ClassifierModule(trained.hparams.backbone, 5, pretrained_file=str(out), image_size=32)
    assert torch.equal(fresh.net.layer3[0].conv1.weight, trained.net.layer3[0].conv1.weight)
    assert fresh.net.fc.out_features == 5


def test_export_softmax_gives_the_softmax_of_the_logits_and_float32_input_the_uint8_outputs(ckpt, tmp_path):
    """``softmax=true``: rows of probabilities equal to the softmax of the ``softmax=false`` export's logits;
    ``input_dtype=float32``: the same outputs for the same 0..255 values given as floats."""
    from visionsweep.export import export

    def exported(name: str, *extra: str):
        info = export(compose_cfg(tmp_path / name, [f"ckpt_path={ckpt}", "format=torchscript", *extra],
                                  config_name="export"))
        path = Path(info["path"])
        return torch.jit.load(str(path)), json.loads(path.with_suffix(".json").read_text())

    (logits_model, logits_side), (probs_model, probs_side), (float_model, float_side) = (
        exported("logits"), exported("probs", "softmax=true"), exported("float", "input_dtype=float32"))
    assert (logits_side["output"]["name"], probs_side["output"]["name"]) == ("logits", "probabilities")
    assert float_side["input"]["dtype"] == "float32" and float_side["input"]["range"] == [0, 255]
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        logits, probs = logits_model(x), probs_model(x)
        from_floats = float_model(x.float())
    assert (logits.sum(1) - 1).abs().max() > 1e-2  # the default export really gives logits
    torch.testing.assert_close(probs.sum(1), torch.ones(6), rtol=0, atol=1e-5)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs, logits.softmax(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(from_floats, logits, rtol=0, atol=1e-5)
