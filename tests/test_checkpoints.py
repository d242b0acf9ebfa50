"""One weights-only loader for every entry point: crafted, truncated or random files are refused in one
line and run no code; ``latest`` skips debug runs and says what it chose; classifier and segmenter
checkpoints dispatch right, and export and the ``see`` model modes work on a segmenter too."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, compose_cfg, run_cli

SEG = ["task=segment", "data.image_size=32", "data.batch_size=8", "augmentation=none", "logger=csv",
       "model.encoder_depth=3", "model.decoder_channels=[32,16,8]", "model.overlay_count=2",
       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
UNSAFE = "is not a safe visionsweep checkpoint"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 torch thread


class _Exploit:
    """Unpickled without weights_only, this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _malicious(path: Path, marker: Path) -> Path:
    """A checkpoint-shaped file (state_dict, hyper_parameters) with the exploit in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": "resnet18", "num_classes": 3},
                "epoch": _Exploit(marker)}, path)
    return path




@pytest.fixture(scope="module")
def classifier(tmp_path_factory, shapes_root) -> Path:
    """last.ckpt of a resnet10t (FAST) trained one epoch on the shapes at 32 px."""
    from visionsweep.train import train

    out = tmp_path_factory.mktemp("cls")
    train(compose_cfg(out, [*FAST, f"data.root={shapes_root}", "trainer.max_epochs=1", "test=false", "seed=0"]))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> Path:
    """last.ckpt of a 3-stage U-Net trained one epoch on generated shape masks at 32 px."""
    from visionsweep.data.builtin import write_shapes_seg
    from visionsweep.train import train

    root = write_shapes_seg(tmp_path_factory.mktemp("data") / "seg", n_images=40, size=32,
                            classes=("circle", "square"), max_shapes=2, seed=0)
    out = tmp_path_factory.mktemp("seg")
    train(compose_cfg(out, [*SEG, f"data.root={root}", "trainer.max_epochs=1", "test=false", "seed=1"]))
    return out / "checkpoints" / "last.ckpt"


def _entry(name: str, tmp: Path, ckpt: str, shapes_root: Path, log_dir: Path | None = None):
    """Run one entry point in-process on ``ckpt`` (what the CLI runs after composing)."""
    extra = [f"paths.log_dir={log_dir}"] if log_dir else []
    if name == "eval":
        from visionsweep.eval import evaluate
        return evaluate(compose_cfg(tmp, [f"ckpt_path={ckpt}", *extra], config_name="eval"))
    if name == "predict":
        from visionsweep.predict import predict
        return predict(compose_cfg(tmp, [f"ckpt_path={ckpt}", f"input={shapes_root}", *extra], config_name="predict"))
    if name == "export":
        from visionsweep.export import export
        return export(compose_cfg(tmp, [f"ckpt_path={ckpt}", *extra], config_name="export"))
    if name == "see":
        from visionsweep.see import see
        return see(compose_cfg(tmp, ["see=features", f"ckpt_path={ckpt}", *extra], config_name="see"))
    from visionsweep.train import train
    return train(compose_cfg(tmp, [*FAST, f"data.root={shapes_root}", "trainer.max_epochs=1", f"ckpt_path={ckpt}",
                                   *extra]))


ENTRY_POINTS = ["eval", "predict", "export", "see", "train"]


def test_the_exploit_is_real(tmp_path):
    """Without weights_only the file runs its command: the tests below would notice a loader that does."""
    marker = tmp_path / "ran"
    _malicious(tmp_path / "evil.ckpt", marker)
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_malicious_checkpoint_runs_no_code(entry, tmp_path, shapes_root):
    from visionsweep.errors import VisionSweepError

    marker = tmp_path / "ran"
    evil = _malicious(tmp_path / "evil" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(VisionSweepError) as info:
        _entry(entry, tmp_path / "out", str(evil), shapes_root)
    msg = str(info.value)
    assert not marker.exists()
    assert msg.startswith(f"{evil.resolve()} {UNSAFE} (it would run code") and "system" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("entry", ["predict", "see", "train"])
def test_latest_with_a_malicious_last_ckpt_is_refused(entry, tmp_path, shapes_root):
    from visionsweep.errors import VisionSweepError

    marker = tmp_path / "ran"
    evil = _malicious(tmp_path / "runs" / "train" / "2026-01-01_00-00-00_000000" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(VisionSweepError, match=UNSAFE) as info:
        _entry(entry, tmp_path / "out", "latest", shapes_root, log_dir=tmp_path / "runs")
    assert str(info.value).startswith(str(evil.resolve())) and not marker.exists()


def _truncated(tmp: Path, real: Path) -> Path:
    data = real.read_bytes()
    (tmp / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    return tmp / "truncated.ckpt"


def _random(tmp: Path, real: Path) -> Path:
    (tmp / "random.ckpt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return tmp / "random.ckpt"


def _text(tmp: Path, real: Path) -> Path:
    (tmp / "README.md").write_text("# notes\nnot a checkpoint\n")
    return tmp / "README.md"


@pytest.mark.parametrize("make", [_truncated, _random, _text], ids=["truncated", "random", "text"])
@pytest.mark.parametrize("entry", ["eval", "predict", "train"])
def test_truncated_and_random_files_give_one_line(entry, make, tmp_path, classifier, shapes_root):
    from visionsweep.checkpoints import CheckpointError

    bad = make(tmp_path, classifier)
    with pytest.raises(CheckpointError) as info:
        _entry(entry, tmp_path / "out", str(bad), shapes_root)
    msg = str(info.value)
    assert msg.startswith(f"{bad.resolve()} {UNSAFE} (") and "\n" not in msg
    # (a text file or random bytes: not the unpickler's "Unsupported operand 35")
    assert ("truncated" in msg) if make is _truncated else msg.endswith(
        "(not a PyTorch file: not a zip archive, nor a pickle that weights-only loading can read)")


def test_cli_predict_latest_malicious_is_one_line_exit_2(tmp_path, shapes_root):
    marker = tmp_path / "ran"
    evil = _malicious(tmp_path / "runs" / "train" / "x" / "checkpoints" / "last.ckpt", marker)
    res = run_cli("predict", "ckpt_path=latest", f"input={shapes_root}", f"paths.log_dir={tmp_path / 'runs'}",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not marker.exists()
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {evil.resolve()} {UNSAFE}"), last
    assert f"ckpt_path=latest → {evil.resolve()}" in res.stdout + res.stderr  # says what latest resolved to


@pytest.mark.scaling  # CLI end to end, same path as a case kept in make test (predict's latest-malicious CLI case; train's refusal is tested in process): make test-scaling
def test_cli_train_resume_from_a_malicious_file(tmp_path, shapes_root):
    marker = tmp_path / "ran"
    evil = _malicious(tmp_path / "evil.ckpt", marker)
    res = run_cli("train", *FAST, f"data.root={shapes_root}", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not marker.exists()
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {evil.resolve()} {UNSAFE}")


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["eval", "export", "see"])
def test_cli_truncated_checkpoint_is_one_line(entry, tmp_path, classifier):
    bad = _truncated(tmp_path, classifier)
    mode = ["see=features"] if entry == "see" else []
    res = run_cli(entry, *mode, f"ckpt_path={bad}", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {bad.resolve()} {UNSAFE} (truncated"), lines


def _fake_run(root: Path, name: str, ckpt: Path, age_s: float, **run_json) -> Path:
    run = root / "train" / name
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, run / "checkpoints" / "last.ckpt")
    (run / "run.json").write_text(json.dumps(run_json))
    stamp = time.time() - age_s
    os.utime(run / "checkpoints" / "last.ckpt", (stamp, stamp))
    return run / "checkpoints" / "last.ckpt"


def test_latest_skips_debug_runs_and_says_what_it_chose(tmp_path, classifier, caplog):
    from visionsweep import checkpoints
    from visionsweep.errors import ConfigError

    runs = tmp_path / "runs"
    real = _fake_run(runs, "a_real", classifier, 300, overrides=["model=resnet18"])
    _fake_run(runs, "b_debug", classifier, 200, overrides=["debug=limit"])
    hydra_debug = _fake_run(runs, "c_debug_hydra", classifier, 100)
    (hydra_debug.parents[1] / ".hydra").mkdir()
    (hydra_debug.parents[1] / ".hydra" / "overrides.yaml").write_text("- +debug=fast\n- seed=3\n")
    _fake_run(runs, "d_debug_flag", classifier, 50, debug="overfit")
    with caplog.at_level("INFO", logger="visionsweep.checkpoints"):
        assert checkpoints.resolve("latest", runs) == real.resolve()
    assert f"ckpt_path=latest → {real.resolve()}" in caplog.text
    assert checkpoints.load("latest", runs).path == real.resolve()
    shutil.rmtree(real.parents[1])
    with pytest.raises(ConfigError, match=r"no checkpoints/last.ckpt under .*\(3 in debug runs skipped\)"):
        checkpoints.resolve("latest", runs)


def test_latest_is_the_newest_last_ckpt_of_several_runs_not_the_newest_folder(tmp_path, classifier):
    """By the checkpoint's time, not by name or folder time: a resumed older run is the latest one."""
    from visionsweep import checkpoints

    runs = tmp_path / "runs"
    older = _fake_run(runs, "2026-01-03_run", classifier, 300)  # the newest name
    newest = _fake_run(runs, "2026-01-01_run", classifier, 10)  # the oldest name, resumed a moment ago
    middle = _fake_run(runs, "2026-01-02_run", classifier, 100)
    assert checkpoints.resolve("latest", runs) == newest.resolve()
    os.utime(middle, None)  # now written last
    assert checkpoints.resolve("latest", runs) == middle.resolve() != older.resolve()


def test_user_paths_expand_the_home_folder(tmp_path, classifier, monkeypatch):
    from visionsweep import checkpoints

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(classifier, tmp_path / "mine.ckpt")
    assert checkpoints.resolve("~/mine.ckpt") == (tmp_path / "mine.ckpt").resolve()


def test_real_checkpoints_dispatch_on_what_they_hold(tmp_path, classifier, segmenter):
    from visionsweep import checkpoints
    from visionsweep.errors import ConfigError
    from visionsweep.models.classifier import ClassifierModule
    from visionsweep.models.segmenter import SegmenterModule

    cls = checkpoints.load(classifier)
    assert cls.kind == "classifier" and isinstance(cls.model, ClassifierModule) and not cls.model.training
    saved = torch.load(classifier, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in cls.model.state_dict().items())
    seg = checkpoints.load(segmenter)
    assert seg.kind == "segmenter" and isinstance(seg.model, SegmenterModule)
    assert seg.train_config().model._target_.endswith("SegmenterModule") and seg.run_dir == segmenter.parents[1]
    raw = torch.load(segmenter, weights_only=True)
    assert raw["visionsweep"]["kind"] == "segmenter"  # the marker the segmenter writes
    del raw["visionsweep"]  # older checkpoints: the hyper-parameters tell
    torch.save(raw, tmp_path / "unmarked.ckpt")
    assert checkpoints.load(tmp_path / "unmarked.ckpt").kind == "segmenter"
    with pytest.raises(ConfigError, match="holds a segmenter, but this needs a classifier"):
        checkpoints.load(segmenter, kind="classifier")


@pytest.mark.parametrize(("content", "reason"), [
    ({"state_dict": {}}, "no state_dict and hyper_parameters"),
    ({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, "neither a visionsweep classifier nor a segmenter"),
    ({"state_dict": {}, "hyper_parameters": {}, "visionsweep": {"kind": "detector"}}, "unknown model kind 'detector'"),
    ("cut", "its weights do not fit the classifier"),
    ([1, 2, 3], "no state_dict"),
])
def test_wrong_content_is_refused_with_its_reason(tmp_path, classifier, content, reason):
    from visionsweep import checkpoints

    if content == "cut":  # a real checkpoint missing one tensor
        content = torch.load(classifier, weights_only=True)
        content["state_dict"].pop(next(k for k in content["state_dict"] if k.startswith("net.")))
    torch.save(content, tmp_path / "x.ckpt")
    with pytest.raises(checkpoints.CheckpointError, match=reason):
        checkpoints.load(tmp_path / "x.ckpt")


def test_resume_refuses_the_other_model_kind(tmp_path, segmenter, shapes_root):
    from visionsweep.errors import ConfigError

    with pytest.raises(ConfigError, match="holds a segmenter, but this run trains a classifier"):
        _entry("train", tmp_path / "out", str(segmenter), shapes_root)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_a_segmenter(segmenter, tmp_path, fmt):
    from visionsweep import checkpoints
    from visionsweep.export import export

    info = export(compose_cfg(tmp_path, [f"ckpt_path={segmenter}", f"format={fmt}"], config_name="export"))
    side = json.loads(Path(info["path"]).with_suffix(".json").read_text())
    assert side["kind"] == "segmenter" and side["class_names"] == ["background", "circle", "square"]
    assert side["output"]["shape"] == ["N", 3, 32, 32] and info["max_abs_diff"] <= 1e-4
    model = checkpoints.load(segmenter).model
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)  # a batch size the export never saw
    with torch.no_grad():
        ref = model(x)
        if fmt == "onnx":
            import onnxruntime as ort

            sess = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
        else:
            got = torch.jit.load(info["path"])(x)
    assert got.shape == ref.shape == (3, 3, 32, 32) and (got - ref).abs().max() <= 1e-4


def test_export_a_segmenters_encoder_as_pretrained_file(segmenter, tmp_path):
    from visionsweep import checkpoints
    from visionsweep.export import export
    from visionsweep.models.classifier import ClassifierModule

    out = tmp_path / "enc.safetensors"
    export(compose_cfg(tmp_path, [f"ckpt_path={segmenter}", "format=state_dict", f"output={out}"],
                       config_name="export"))
    encoder = checkpoints.load(segmenter).model.net.encoder.model
    fresh = ClassifierModule("resnet18", 4, pretrained_file=str(out), image_size=32)
    assert torch.equal(fresh.net.layer2[0].conv1.weight, encoder.layer2[0].conv1.weight)


def _pngs_ok(out: Path, result: dict) -> None:
    assert result["files"]
    for f in result["files"]:
        with Image.open(out / f["file"]) as im:
            assert im.size == (f["width"], f["height"]) and np.asarray(im.convert("L")).std() > 5


def test_see_model_modes_on_a_segmenter(segmenter, tmp_path):
    from visionsweep.see import see

    def run(name: str, *extra: str) -> dict:
        out = tmp_path / name
        result = see(compose_cfg(out, [f"see={name}", f"ckpt_path={segmenter}", *extra], config_name="see"))
        _pngs_ok(out, result)
        return result

    features = run("features", "see.top_k=4", "see.max_images=3")
    layers = [f for f in features["files"] if f["file"].startswith("features_0")]
    # the encoder's stages at depth 3 (the unused layer3/4 are not there), shrinking like their strides
    assert [f["layer"] for f in layers] == ["act1", "layer1", "layer2"]
    assert [f["map_size"][0] for f in layers] == [16, 8, 4] and all(f["rows"] == 3 for f in layers)
    assert run("filters")["layer"] == "conv1"
    occlusion = run("occlusion", "see.window=8", "see.stride=4", "see.max_images=3")
    maps = np.load(tmp_path / "occlusion" / "occlusion_maps.npy")
    assert maps.shape == (3, 32, 32) and np.isfinite(maps).all() and np.abs(maps).max() > 0
    assert all(r["target"] != "background" for r in occlusion["results"])  # the largest object class
    cam = run("gradcam", "see.classes=[circle]", "see.max_images=3")
    assert cam["layer"] == "layer2" and (cam["files"][0]["rows"], cam["files"][0]["cols"]) == (3, 3)


def test_see_errors_on_a_segmenter_matches_eval(segmenter, tmp_path):
    """The pixel confusion matrix is the one eval's torchmetrics gives on the same split."""
    from visionsweep.eval import evaluate
    from visionsweep.see import see

    metrics = evaluate(compose_cfg(tmp_path / "eval", [f"ckpt_path={segmenter}", "split=val"], config_name="eval"))
    report = json.loads((tmp_path / "eval" / "run.json").read_text())["test_report"]
    out = tmp_path / "see"
    result = see(compose_cfg(out, ["see=errors", f"ckpt_path={segmenter}", "see.top_k=3"], config_name="see"))
    _pngs_ok(out, result)
    assert result["split"] == "val" and result["confusion_matrix"] == report["confusion_matrix"]
    assert result["miou"] == pytest.approx(metrics["val/miou"], abs=1e-5)
    for name, row in report["per_class"].items():
        if row["iou"] is not None:
            assert result["per_class"][name]["iou"] == pytest.approx(row["iou"], abs=1e-5)
            assert result["per_class"][name]["f1"] == pytest.approx(row["dice"], abs=1e-5)  # pixel F1 = Dice
    losses = [g["loss"] for g in result["top_losses"]]
    assert len(losses) == 3 and losses == sorted(losses, reverse=True)
    assert [(f["rows"], f["cols"]) for f in result["files"] if f["file"] == "top_losses.png"] == [(3, 3)]


def test_predict_a_segmenter_writes_masks(segmenter, tmp_path, shapes_root):
    from visionsweep.predict import predict

    image = next((shapes_root / "circle").glob("*.png"))
    rows = predict(compose_cfg(tmp_path, [f"ckpt_path={segmenter}", f"input={image}"], config_name="predict"))
    with Image.open(rows[0]["path"]) as mask:
        assert mask.mode == "P" and mask.size == Image.open(image).size and np.asarray(mask).max() < 3


def test_predict_a_segmenter_skips_an_unreadable_file_and_lists_it(segmenter, tmp_path, shapes_root):
    import json
    import shutil

    from visionsweep.errors import DataError
    from visionsweep.predict import predict

    folder = tmp_path / "in"
    folder.mkdir()
    for image in sorted((shapes_root / "circle").glob("*.png"))[:2]:
        shutil.copy(image, folder / image.name)
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"broken\.png.*skip_bad_images=true"):  # without the key: stops there
        predict(compose_cfg(tmp_path / "stop", [f"ckpt_path={segmenter}", f"input={folder}"], config_name="predict"))
    out = tmp_path / "skip"
    rows = predict(compose_cfg(out, [f"ckpt_path={segmenter}", f"input={folder}", "skip_bad_images=true"],
                               config_name="predict"))
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in folder.glob("*.png") if p.stem != "broken")
    run = json.loads((out / "run.json").read_text())
    assert run["n_images"] == 2 and [Path(s["path"]).name for s in run["skipped"]] == ["broken.png"]
    assert not (out / "masks" / "broken.png").exists()
