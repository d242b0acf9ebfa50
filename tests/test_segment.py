"""Segmentation: a tiny U-Net learns generated shapes through the train path; joint augmentation keeps
image and mask aligned; any size goes in and the same size comes out; bad masks give clear messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONF, compose_cfg

# tiny and fast: resnet18 encoder cut to 3 stages, narrow decoder, 32 px, 12 epochs of 224 images
SEG = ["task=segment", "data.image_size=32", "data.batch_size=8", "augmentation=none", "logger=csv",
       "model.encoder_depth=3", "model.decoder_channels=[32,16,8]", "model.overlay_count=4",
       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
COLOURS = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)], np.uint8)  # class k ↔ colour k

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 torch thread




@pytest.fixture(scope="module")
def seg_root(tmp_path_factory) -> Path:
    from visionsweep.data.builtin import write_shapes_seg

    return write_shapes_seg(tmp_path_factory.mktemp("data") / "shapes_seg", n_images=320, size=32,
                            classes=("circle", "square"), max_shapes=2, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, seg_root) -> tuple[Path, dict]:
    from visionsweep.train import train

    out = tmp_path_factory.mktemp("segrun")
    return out, train(compose_cfg(out, [*SEG, f"data.root={seg_root}", "trainer.max_epochs=12", "seed=1"]))


def _all_background_miou(root: Path, split_csv: Path, n_classes: int) -> float:
    """mIoU of predicting background everywhere: IoU_bg = background share of all pixels, the others 0."""
    masks = [np.asarray(Image.open(root / row["mask"])) for row in csv.DictReader(split_csv.open())]
    return float(np.mean([(m == 0).mean() for m in masks])) / n_classes


def test_tiny_unet_learns_above_all_background_baseline(trained, seg_root):
    out, metrics = trained
    baseline = _all_background_miou(seg_root, out / "splits" / "val.csv", 3)
    assert 0.2 < baseline < 0.32
    # +0.2 needs most shape pixels found and told apart: foreground alone (one shape class) would not pass
    assert metrics["val/miou_best"] >= baseline + 0.2, (baseline, metrics)
    assert metrics["test/miou"] >= baseline + 0.1, (baseline, metrics)


@pytest.mark.slow
def test_default_reaches_miou_080(tmp_path):
    """The real ``task=segment`` default (data, model, epochs as configured) segments: val mIoU >= 0.8."""
    from visionsweep.train import train

    root = tmp_path / "data" / "shapes_seg"
    metrics = train(compose_cfg(tmp_path / "run", ["task=segment", f"data.root={root}", "logger=csv",
                                                   "trainer.enable_progress_bar=false"]))
    baseline = _all_background_miou(root, tmp_path / "run" / "splits" / "val.csv", 4)
    assert baseline < 0.25 and metrics["val/miou_best"] >= 0.8, (baseline, metrics)
    assert metrics["test/miou"] >= 0.75 and (tmp_path / "run" / "plots" / "val_overlays.png").is_file()


def test_run_dir_has_per_class_iou_overlays_and_miou_checkpoint(trained):
    out, metrics = trained
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "ok" and run["data"]["classes"] == ["background", "circle", "square"]
    per_class = run["test_report"]["per_class"]
    assert set(per_class) == {"background", "circle", "square"} and per_class["background"]["iou"] > 0.5
    assert run["test_report"]["miou"] == pytest.approx(metrics["test/miou"], abs=1e-5)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {"val/miou", "val/dice", "val/miou_best", "train/loss"} <= set(rows[0])
    best = max(float(r["val/miou"]) for r in rows if r["val/miou"])
    assert Path(run["best_checkpoint"]).is_file() and metrics["val/miou_best"] == pytest.approx(best, abs=1e-5)
    with Image.open(out / "plots" / "val_overlays.png") as img:
        assert img.format == "PNG" and img.width == 600 and img.height > 4 * 150
    assert (out / "splits" / "train.csv").read_text().startswith("image,mask\n")


def test_eval_reproduces_test_miou(trained, tmp_path):
    from visionsweep.eval import evaluate

    out, metrics = trained
    best = json.loads((out / "run.json").read_text())["best_checkpoint"]
    result = evaluate(compose_cfg(tmp_path / "eval", [f"ckpt_path={best}"], config_name="eval"))
    assert result["test/miou"] == pytest.approx(metrics["test/miou"], abs=1e-6)


def test_any_size_round_trips_to_the_original_size(trained, tmp_path):
    from visionsweep.data.segmentation import pad_collate
    from visionsweep import checkpoints
    from visionsweep.models.segmenter import SegmenterModule, predict_folder

    model = SegmenterModule("resnet18", 3, decoder_channels=[16, 16, 8, 8, 8]).eval()
    assert model.stride == 32
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 50, 70, dtype=torch.uint8)).shape == (2, 3, 50, 70)
    x, y = pad_collate([(torch.ones(3, 5, 7, dtype=torch.uint8), torch.zeros(5, 7, dtype=torch.long)),
                        (torch.ones(3, 6, 4, dtype=torch.uint8), torch.zeros(6, 4, dtype=torch.long))], 255)
    assert x.shape == (2, 3, 6, 7) and y[0, 5].eq(255).all() and y[1, :, 4:].eq(255).all() and x[1, :, :, 4:].eq(0).all()
    best = json.loads((trained[0] / "run.json").read_text())["best_checkpoint"]
    loaded = checkpoints.load(best)  # predict dispatches on the kind the checkpoint records
    assert loaded.kind == "segmenter"
    trained_model = loaded.model
    (tmp_path / "in").mkdir()
    sizes = {"a": (70, 50), "b": (33, 47)}  # (width, height), neither divisible by the stride
    for name, size in sizes.items():
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(
            tmp_path / "in" / f"{name}.jpg")
    written = predict_folder(trained_model, tmp_path / "in", tmp_path / "out")
    assert sorted(p.name for p in written) == ["a.png", "b.png"]
    for path in written:
        with Image.open(path) as mask:
            assert mask.size == sizes[path.stem] and mask.mode == "P" and np.asarray(mask).max() < 3


def _geometric(transforms) -> list:
    import albumentations as A

    out = []
    for t in transforms:
        if isinstance(t, A.BaseCompose):
            out += _geometric(t.transforms)
        elif isinstance(t, A.DualTransform) and "Dropout" not in type(t).__name__:
            out.append(t)
    return out


def test_joint_augmentation_keeps_image_and_mask_aligned():
    import albumentations as A
    from omegaconf import OmegaConf

    from visionsweep.augment import build_pipelines

    preset = OmegaConf.merge({"data": {"image_size": 64}},
                             {"augmentation": OmegaConf.load(CONF / "augmentation" / "strong.yaml")}).augmentation
    train, _ = build_pipelines(preset, 64, seed=0)
    transforms = _geometric(train.transforms)
    assert {"RandomResizedCrop", "HorizontalFlip", "Affine", "Perspective", "ElasticTransform"} <= {
        type(t).__name__ for t in transforms}
    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(0, 4, (8, 8)), np.ones((10, 10), int)).astype(np.uint8)  # 80 px, 10 px cells
    image = COLOURS[labels]

    def agreement(img: np.ndarray, mask: np.ndarray) -> float:  # mask read back from the image's colours
        derived = np.abs(img[:, :, None, :].astype(int) - COLOURS[None, None].astype(int)).sum(-1).argmin(-1)
        return float((derived == mask).mean())

    assert agreement(image[:, ::-1], labels) < 0.6  # the check notices a misaligned mask
    for i, t in enumerate(transforms):
        t.p = 1.0
        out = A.Compose([t], seed=i)(image=image, mask=labels)
        assert out["mask"].dtype == np.uint8 and set(np.unique(out["mask"])) <= {0, 1, 2, 3}  # nearest
        assert agreement(out["image"], out["mask"]) > 0.9, type(t).__name__


def _pair(root: Path, name: str, image: np.ndarray, mask: np.ndarray | None) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{name}.png")
    if mask is not None:
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")


@pytest.mark.parametrize(("case", "message"), [
    ("missing", r"image '.*c\.png' has no mask: expected '.*masks/c\.png'"),
    ("size", r"mask '.*c\.png' is 12x10 but image '.*c\.png' is 10x12"),
    ("values", r"mask '.*c\.png' has values \[7\] outside 0\.\.2 \(3 classes\) that are not data.ignore_index=255"),
    ("rgb", r"mask '.*c\.png' is an RGB colour image .*class indices are expected"),
])
def test_bad_mask_gives_its_message(tmp_path, case, message):
    from visionsweep.data.segmentation import SegmentationDataModule
    from visionsweep.errors import DataError

    img = np.zeros((12, 10, 3), np.uint8)
    good = np.zeros((12, 10), np.uint8)
    good[2:5, 2:5], good[0, 0] = 2, 255  # 255: ignore_index, allowed anywhere
    for name in ("a", "b"):
        _pair(tmp_path, name, img, good)
    (tmp_path / "classes.yaml").write_text("[background, cat, dog]\n")
    bad = {"missing": None, "size": np.zeros((10, 12), np.uint8), "values": np.full((12, 10), 7, np.uint8),
           "rgb": COLOURS[np.arange(120).reshape(12, 10) % 4]}[case]
    _pair(tmp_path, "c", img, bad)
    with pytest.raises(DataError, match=message):
        SegmentationDataModule(str(tmp_path), num_workers=0).setup()


def test_binary_masks_and_split_folders(tmp_path):
    from visionsweep.data.segmentation import SegmentationDataModule
    from visionsweep.errors import ConfigError

    mask = np.zeros((12, 10), np.uint8)
    mask[3:7, 2:6] = 255
    for split in ("train", "val"):
        _pair(tmp_path / split, "x", np.zeros((12, 10, 3), np.uint8), mask)
    dm = SegmentationDataModule(str(tmp_path), num_workers=0, eval_resize="none")
    assert dm.classes == ["background", "foreground"] and dm.split_source == "folders"
    _, y = next(iter(dm.val_dataloader()))
    assert y.shape == (1, 12, 10) and int(y.sum()) == 16 and set(y.unique().tolist()) == {0, 1}
    with pytest.raises(ConfigError, match="data.root is required"):
        SegmentationDataModule(None)


def test_joint_augmentation_does_not_depend_on_the_worker_count(tmp_path):
    import albumentations as A

    from visionsweep.data.segmentation import SegmentationDataset, pad_collate
    from visionsweep.data.seeding import SeededDataLoader

    img = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    mask = (np.arange(144).reshape(12, 12) % 3).astype(np.uint8)
    pairs = []
    for i in range(6):  # one picture six times: only the augmentation tells the samples apart
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / f"{i}_m.png")
        pairs.append((tmp_path / f"{i}.png", tmp_path / f"{i}_m.png"))

    def epochs(workers: int) -> list:
        ds = SegmentationDataset(pairs, A.Compose([A.RandomCrop(8, 8), A.HorizontalFlip()], seed=0))
        loader = SeededDataLoader(ds, batch_size=2, num_workers=workers, persistent_workers=workers > 0,
                                collate_fn=lambda b: pad_collate(b, ignore_index=255))
        torch.manual_seed(0)
        return [[torch.cat(t) for t in zip(*loader)] for _ in range(2)]

    ref, got = epochs(0), epochs(2)
    for (x, m), (gx, gm) in zip(ref, got):
        assert torch.equal(x, gx) and torch.equal(m, gm)
    assert not torch.equal(ref[0][0], ref[1][0])  # epochs draw anew


def test_builtin_from_an_older_generator_is_written_anew(tmp_path, caplog):
    from visionsweep.data.builtin import write_shapes_seg
    from visionsweep.data.segmentation import SegmentationDataModule

    opts = {"n_images": 6, "size": 16, "classes": ["circle"], "max_shapes": 1}
    root = write_shapes_seg(tmp_path / "s", **opts)
    marker = root / ".complete"
    old = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: v for k, v in old.items() if k != "version"}))  # as version 1 wrote it
    (root / "masks" / "0000.png").unlink()
    SegmentationDataModule(str(root), builtin="shapes_seg", builtin_options=opts, num_workers=0).setup()
    assert json.loads(marker.read_text()) == old and (root / "masks" / "0000.png").is_file()
    # other options only warn: a set written on purpose (like this file's small one) is kept
    dm = SegmentationDataModule(str(root), builtin="shapes_seg", builtin_options={**opts, "n_images": 9},
                                num_workers=0)
    dm.setup()
    assert json.loads(marker.read_text()) == old and "other data.builtin_options" in caplog.text
