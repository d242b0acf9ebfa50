"""Tests of the augmentation presets and the pipeline builder (visionsweep.augment)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import visionsweep  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE before albumentations is imported)
from visionsweep.augment import build_pipelines, save_pipelines
from visionsweep.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "augmentation"
PRESETS = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
SIZE = 32


def load_preset(name: str, image_size: int = SIZE):
    """The preset as Hydra would hand it over: a node under a root that has data.image_size."""
    preset = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    root = OmegaConf.merge({"data": {"image_size": image_size}}, {"augmentation": preset})
    return root.augmentation


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_all_presets_present():
    assert {"none", "light", "basic", "strong"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_and_gives_square_uint8(name):
    cfg = load_preset(name)
    assert cfg.name == name
    train, evaluate = build_pipelines(cfg, SIZE, crop_pct=0.875, interpolation="bicubic", seed=0)
    for h, w in [(40, 57), (8, 8)]:
        for pipeline in (train, evaluate):
            for _ in range(3):
                out = pipeline(image=image(h, w))["image"]
                assert out.shape == (SIZE, SIZE, 3)
                assert out.dtype == np.uint8


@pytest.mark.parametrize("name", PRESETS)
def test_preset_accepts_resolved_dict_and_pickles(name):
    cfg = OmegaConf.to_container(load_preset(name), resolve=True)
    train, evaluate = build_pipelines(cfg, SIZE, seed=1)
    train2 = pickle.loads(pickle.dumps(train))
    assert train2(image=image(40, 57))["image"].shape == (SIZE, SIZE, 3)
    pickle.loads(pickle.dumps(evaluate))


def test_unresolvable_preset_is_config_error():
    with pytest.raises(ConfigError, match="augmentation 'basic'"):
        build_pipelines(OmegaConf.load(CONF_DIR / "basic.yaml"), SIZE)


def test_eval_is_resize_and_centre_crop_only_and_deterministic():
    _, evaluate = build_pipelines(load_preset("strong"), SIZE, crop_pct=0.875)
    assert [type(t).__name__ for t in evaluate.transforms] == ["SmallestMaxSize", "CenterCrop"]
    assert evaluate.transforms[0].max_size in (37, [37])  # round(32 / 0.875)
    img = image(40, 57)
    np.testing.assert_array_equal(evaluate(image=img)["image"], evaluate(image=img)["image"])


def test_none_preset_train_equals_eval():
    train, evaluate = build_pipelines(load_preset("none"), SIZE)
    img = image(40, 57)
    np.testing.assert_array_equal(train(image=img)["image"], evaluate(image=img)["image"])


def test_strong_train_is_random():
    train, _ = build_pipelines(load_preset("strong"), SIZE, seed=0)
    img = image(40, 57)
    outs = [train(image=img)["image"] for _ in range(4)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def test_same_seed_same_augmentations():
    img = image(40, 57)
    a, _ = build_pipelines(load_preset("strong"), SIZE, seed=7)
    b, _ = build_pipelines(load_preset("strong"), SIZE, seed=7)
    for _ in range(3):
        np.testing.assert_array_equal(a(image=img)["image"], b(image=img)["image"])


def test_default_seed_follows_torch_seed():
    torch = pytest.importorskip("torch")
    img = image(40, 57)
    torch.manual_seed(123)
    a, _ = build_pipelines(load_preset("strong"), SIZE)
    torch.manual_seed(123)
    b, _ = build_pipelines(load_preset("strong"), SIZE)
    np.testing.assert_array_equal(a(image=img)["image"], b(image=img)["image"])


def test_light_never_flips():
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[:, : SIZE // 2] = 255  # bright left half
    train, _ = build_pipelines(load_preset("light"), SIZE, seed=0)
    for _ in range(50):
        out = train(image=img)["image"].astype(float)
        assert out[:, : SIZE // 2].mean() > out[:, SIZE // 2 :].mean() + 50


def test_extra_transform_is_honoured():
    cfg = OmegaConf.to_container(load_preset("basic"), resolve=True)
    cfg["train"].append({"_target_": "albumentations.GaussNoise", "std_range": [0.1, 0.2], "p": 1.0})
    train, _ = build_pipelines(cfg, SIZE, seed=0)
    noise = train.transforms[-1]
    assert type(noise).__name__ == "GaussNoise"
    assert tuple(noise.std_range) == (0.1, 0.2)
    assert noise.p == 1.0


def test_nested_oneof_is_built():
    train, _ = build_pipelines(load_preset("strong"), SIZE, seed=0)
    one_of = next(t for t in train.transforms if type(t).__name__ == "OneOf")
    assert [type(t).__name__ for t in one_of.transforms] == ["Perspective", "ElasticTransform"]


def _one_line_error(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        build_pipelines(cfg, SIZE, seed=0)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("augmentation 'basic':")
    return msg


def _basic_with(transform: dict) -> dict:
    return {"name": "basic", "resize_first": True, "train": [transform]}


def test_unknown_transform_suggests_close_name():
    msg = _one_line_error(_basic_with({"_target_": "albumentations.RandomCropp", "height": 8, "width": 8}))
    assert "unknown transform 'albumentations.RandomCropp'" in msg
    assert "did you mean" in msg and "RandomCrop" in msg


def test_unknown_nested_transform():
    nested = {"_target_": "albumentations.OneOf", "transforms": [{"_target_": "albumentations.Blurr"}]}
    assert "Blur" in _one_line_error(_basic_with(nested))


@pytest.mark.parametrize(
    ("transform", "expected"),
    [
        ({"_target_": "albumentations.HorizontalFlip", "prob": 0.5}, "HorizontalFlip"),  # unknown kwarg (only warns)
        ({"_target_": "albumentations.CoarseDropout", "max_holes": 4}, "CoarseDropout"),  # albumentations 1.x name
        ({"_target_": "albumentations.Affine", "rotate": "lots"}, "Affine"),  # pydantic type error
        ({"_target_": "albumentations.HorizontalFlip", "p": 2.0}, "HorizontalFlip"),  # out of range
        ({"_target_": "albumentations.CoarseDropout", "num_holes_range": [5, 1]}, "CoarseDropout"),  # validator
        ({"_target_": "albumentations.RandomResizedCrop", "scale": [0.5, 1.0]}, "RandomResizedCrop"),  # missing size
    ],
)
def test_bad_argument_names_transform(transform, expected):
    msg = _one_line_error(_basic_with(transform))
    assert f"bad argument for {expected}" in msg


def test_unknown_kwarg_suggests_close_name():
    msg = _one_line_error(_basic_with({"_target_": "albumentations.HorizontalFlip", "pp": 0.5}))
    assert "'pp'" in msg and "'p'" in msg


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "basic", "train": {"_target_": "albumentations.HorizontalFlip"}},  # not a list
        {"name": "basic", "train": [{"p": 0.5}]},  # no _target_
        {"name": "basic", "trian": []},  # typo in a key
        {"name": "basic", "train": [{"_target_": "os.path.join"}]},  # not a transform
    ],
)
def test_malformed_preset_is_config_error(cfg):
    _one_line_error(cfg)


def test_wrong_output_size_is_config_error():
    msg = _one_line_error({"name": "basic", "train": [{"_target_": "albumentations.HorizontalFlip"}]})
    assert "train pipeline gives 64x48, expected 32x32" in msg


def test_unknown_interpolation():
    with pytest.raises(ConfigError, match="interpolation"):
        build_pipelines(load_preset("none"), SIZE, interpolation="bogus")


def test_save_pipelines_writes_json(tmp_path):
    train, evaluate = build_pipelines(load_preset("strong"), SIZE, seed=0)
    path = save_pipelines(train, evaluate, tmp_path / "run" / "augmentations.json")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    assert set(data) == {"train", "eval"}
    names = [t["__class_fullname__"] for t in data["eval"]["transform"]["transforms"]]
    assert names == ["SmallestMaxSize", "CenterCrop"]


class _Noise:
    """Tiny dataset seeded as the project's datasets are, but read through a plain DataLoader (no epoch seed)."""

    def __init__(self, pipeline):
        from visionsweep.data.seeding import SampleSeeder

        self.pipeline, self.seeder = pipeline, SampleSeeder()

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        from visionsweep.data.seeding import seed_sample

        seed_sample(self.seeder, self.pipeline, index)
        return self.pipeline(image=np.full((40, 57, 3), 128, np.uint8))["image"]


def test_plain_dataloader_workers_draw_different_augmentations():
    torch = pytest.importorskip("torch")

    train, _ = build_pipelines(load_preset("strong"), SIZE, seed=0)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(_Noise(train), batch_size=1, num_workers=2)
    first, second = [b[0].numpy() for b in loader][:2]  # item 0 from worker 0, item 1 from worker 1
    assert not np.array_equal(first, second)
