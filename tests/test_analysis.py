"""The picture-making pieces without a trained model: kernels, padding, confusion statistics, ViTs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from visionsweep.analysis import kernels, plots
from visionsweep.analysis.interpret import confusion_matrix, most_confused, per_class
from visionsweep.errors import ConfigError


def _step(axis: int, size: int = 40) -> np.ndarray:
    """A gray image that is 0 on one side of a straight edge and 1 on the other."""
    img = np.zeros((size, size))
    if axis == 0:
        img[size // 2:, :] = 1.0    # one horizontal edge (intensity changes going down)
    else:
        img[:, size // 2:] = 1.0    # one vertical edge (intensity changes going right)
    return img


@pytest.mark.parametrize("padding", ["reflect", "nearest"])
def test_edge_kernels_respond_to_their_orientation_only(padding):
    horizontal, vertical = _step(0), _step(1)
    h_on_h = np.abs(kernels.convolve(horizontal, kernels.KERNELS["horizontal_edge"], padding))
    v_on_h = np.abs(kernels.convolve(horizontal, kernels.KERNELS["vertical_edge"], padding))
    v_on_v = np.abs(kernels.convolve(vertical, kernels.KERNELS["vertical_edge"], padding))
    h_on_v = np.abs(kernels.convolve(vertical, kernels.KERNELS["horizontal_edge"], padding))
    # strong response exactly on the two rows (columns) beside the edge, nothing elsewhere
    assert set(np.nonzero(h_on_h.max(axis=1) > 1)[0]) == {19, 20}
    assert set(np.nonzero(v_on_v.max(axis=0) > 1)[0]) == {19, 20}
    assert h_on_h.max() == pytest.approx(3.0) and v_on_v.max() == pytest.approx(3.0)
    assert v_on_h.max() == 0 and h_on_v.max() == 0
    # the Laplacian sees both, and nothing on flat regions
    lap = np.abs(kernels.convolve(horizontal + vertical, kernels.KERNELS["laplacian"], padding))
    assert lap[5, 5] == 0 and lap[20, 5] > 0 and lap[5, 20] > 0


def test_blur_equals_scipy_and_keeps_the_mean():
    img = np.random.default_rng(0).random((30, 45))
    for name, size in (("box3", 3), ("box11", 11)):
        out = kernels.convolve(img, kernels.KERNELS[name], "zero")
        expected = ndimage.convolve(img, np.ones((size, size)) / size**2, mode="constant", cval=0.0)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
        reflect = kernels.convolve(img, kernels.KERNELS[name], "reflect")
        assert reflect.mean() == pytest.approx(img.mean(), abs=0.02)
        assert reflect.std() < img.std()   # blurred: less contrast


def test_padding_modes_change_the_border_only():
    img = np.random.default_rng(1).random((40, 50)) + 0.5
    kernel = kernels.KERNELS["box11"]
    r = 5  # half the kernel: pixels further in never see the padding
    outs = {m: kernels.convolve(img, kernel, m) for m in ("zero", "reflect", "nearest")}
    for a in outs:
        for b in outs:
            if a < b:
                np.testing.assert_allclose(outs[a][r:-r, r:-r], outs[b][r:-r, r:-r], atol=1e-12)
                border = np.ones(img.shape, bool)
                border[r:-r, r:-r] = False
                assert np.abs(outs[a] - outs[b])[border].max() > 0.01, (a, b)
    assert outs["zero"][0, 0] < 0.5 * outs["reflect"][0, 0]   # zeros darken the corner
    with pytest.raises(ConfigError, match="see.padding=circular"):
        kernels.convolve(img, kernel, "circular")


def test_kernel_list_and_yaml_kernels():
    got = kernels.parse_kernels(["box3"], {"sharpen": [[0, -1, 0], [-1, 5, -1], [0, -1, 0]]})
    assert list(got) == ["box3", "sharpen"] and got["sharpen"].shape == (3, 3)
    with pytest.raises(ConfigError, match="unknown kernel.*blurr"):
        kernels.parse_kernels(["blurr"], None)
    with pytest.raises(ConfigError, match="see.extra.bad"):
        kernels.parse_kernels([], {"bad": [1, 2, 3]})


def test_kernel_and_padding_grids_have_their_planned_size(tmp_path):
    index = plots.Index(tmp_path, "kernels")
    gray = kernels.to_gray(np.random.default_rng(2).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    kernels.kernel_grid(gray, dict(kernels.KERNELS), "zero", index, "k", "noise")
    kernels.padding_grid(gray, kernels.KERNELS["box11"], index, "p", "noise")
    index.write()
    files = json.loads((tmp_path / "index.json").read_text())["files"]
    assert [(f["rows"], f["cols"]) for f in files] == [(5, 2), (1, 4)]
    for f in files:
        with Image.open(tmp_path / f["file"]) as im:
            expected = plots.grid_size(f["rows"], f["cols"], f["panel"], f["dpi"], f["aspect"])
            assert im.size == expected == (f["width"], f["height"])
            assert np.asarray(im.convert("L")).std() > 10   # drawn, not blank


def test_confusion_and_per_class_match_torchmetrics():
    from torchmetrics.classification import (
        MulticlassConfusionMatrix, MulticlassF1Score, MulticlassPrecision, MulticlassRecall)

    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    cm = confusion_matrix(y, p, 4)
    yt, pt = torch.from_numpy(y), torch.from_numpy(p)
    assert cm.sum() == 200
    assert (cm == MulticlassConfusionMatrix(num_classes=4)(pt, yt).numpy()).all()
    stats = per_class(cm)
    for key, metric in (("precision", MulticlassPrecision), ("recall", MulticlassRecall),
                        ("f1", MulticlassF1Score)):
        np.testing.assert_allclose(stats[key], metric(num_classes=4, average=None)(pt, yt).numpy(), atol=1e-6)
    pairs = most_confused(cm, list("abcd"), 3)
    off = cm - np.diag(np.diag(cm))
    assert pairs[0]["count"] == off.max() and [q["count"] for q in pairs] == sorted(off.flatten())[::-1][:3]


@pytest.fixture(scope="module")
def vit():
    from visionsweep.models.classifier import ClassifierModule

    torch.manual_seed(0)
    return ClassifierModule("vit_tiny_patch16_224", num_classes=3, image_size=32, mean=(0.5,) * 3,
                            std=(0.5,) * 3).eval()


def test_vit_features_and_occlusion_work_and_gradcam_says_why_not(vit):
    from visionsweep.analysis.cam import cam_layer
    from visionsweep.analysis.features import activations, choose_layers, feature_points, first_conv
    from visionsweep.analysis.occlusion import baseline_value, occlusion_maps

    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    info = feature_points(vit.net)
    idx = choose_layers(info, None)
    assert idx == [0, 4, 7, 11]   # 4 of the 12 blocks, shallow to deep
    acts = activations(vit, x, idx)
    assert [tuple(a.shape) for a in acts] == [(2, 192, 2, 2)] * 4   # tokens as a 2x2 grid (32 / 16)
    maps = occlusion_maps(vit, x, [0, 1], 8, 8, baseline_value("mean", (0.5,) * 3))
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all()
    assert first_conv(vit.net)[0] == "patch_embed.proj"
    with pytest.raises(ConfigError, match="gradcam does not apply to vit_tiny_patch16_224.*see=occlusion"):
        cam_layer(vit, x)


def _mean_gradient(img: np.ndarray) -> float:
    gy, gx = np.gradient(np.asarray(img, dtype=np.float64))
    return float(np.hypot(gx, gy).mean())


def test_sharpen_is_shown_sharper_and_edges_centred_on_zero():
    rng = np.random.default_rng(4)
    img = np.clip(ndimage.gaussian_filter(rng.random((64, 64)), 2) * 3 - 1, 0, 1)  # smooth blobs + flat areas
    img[:, :8] = 0.4   # a flat strip: sharpening must leave its brightness alone
    sharpen = np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], dtype=float)
    shown, style, how = kernels.display(kernels.convolve(img, sharpen, "reflect"), sharpen)
    assert (style["vmin"], style["vmax"]) == (0.0, 1.0) and style["cmap"] == "gray" and "clipped" in how
    assert _mean_gradient(shown) > 1.2 * _mean_gradient(img)   # what the viewer sees is sharper
    np.testing.assert_allclose(shown[2:-2, 1:6], 0.4, atol=1e-9)   # same grey, not rescaled
    # the seed's un-normalised all-ones blur keeps the brightness once divided by its sum
    ones = np.ones((3, 3))
    blurred, _, _ = kernels.display(kernels.convolve(img, ones, "reflect"), ones)
    assert blurred.mean() == pytest.approx(img.mean(), abs=0.01) and _mean_gradient(blurred) < _mean_gradient(img)
    edges, style, _ = kernels.display(kernels.convolve(img, kernels.KERNELS["vertical_edge"], "reflect"),
                                      kernels.KERNELS["vertical_edge"])
    assert style["vmin"] == -style["vmax"] > -np.inf and style["cmap"] == "RdBu_r"   # 0 in the middle
    assert style["vmax"] <= np.abs(edges).max()


def test_occlusion_and_gradcam_figures_have_colour_bars_and_name_their_class():
    from visionsweep.analysis.cam import cam_figure
    from visionsweep.analysis.occlusion import occlusion_figure

    rng = np.random.default_rng(5)
    views = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    maps = rng.normal(size=(2, 16, 16)).astype(np.float32)
    fig = occlusion_figure(views, maps, ["a", "b"], ["cat", "dog"], ["cat", "cat"], [0.9, 0.6])
    assert len(fig.axes) == 2 * 3 + 2   # a colour bar per drop map
    titles = [ax.get_title() for ax in fig.axes]
    assert "occlusion: drop in p(cat)" in titles and "occlusion: drop in p(dog)" in titles
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2 and bars[0].get_ylim() == pytest.approx((-np.abs(maps[0]).max(), np.abs(maps[0]).max()))
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    fig = cam_figure(views, ["a", "b"], [([0, 1], np.abs(maps)), ([1, 1], np.abs(maps))], ["cat", "dog"], probs)
    assert len(fig.axes) == 2 * 3 + 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles.count("Grad-CAM for class cat\np=0.70 (predicted)") == 1
    assert sum(t.startswith("Grad-CAM for class dog") for t in titles) == 3
    plt = pytest.importorskip("matplotlib.pyplot")
    plt.close("all")


def test_top_loss_titles_say_predicted_actual_and_loss():
    from visionsweep.analysis.interpret import top_loss_title

    for pred, actual in (("3", "8"), ("triangle", "circle")):
        title = top_loss_title(pred, actual, 2.3456, 0.91)
        assert f"pred {pred} / actual {actual} /" in title and "loss 2.35" in title and "p(pred) 0.91" in title
        assert all(len(line) <= 32 for line in title.splitlines())   # fits its cell


def test_background_baseline_is_each_images_border_colour():
    from visionsweep.analysis.occlusion import baseline_value

    x = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    x[0, :, 4:12, 4:12] = 255     # a white digit on black
    x[1] = 200                    # a light photo
    x[1, :, 6:10, 6:10] = 10
    fill = baseline_value("background", (0.5,) * 3, x)
    assert fill.shape == (2, 3, 1, 1) and fill[0].flatten().tolist() == [0.0] * 3
    assert fill[1].flatten().tolist() == [200.0] * 3
    with pytest.raises(ConfigError, match="see.baseline=pink"):
        baseline_value("pink", (0.5,) * 3)


def test_one_pixel_feature_maps_say_their_value_and_get_a_layer_wide_scale():
    from visionsweep.analysis.features import _map_title, _one_pixel_scale

    act = torch.tensor([[[4.1]], [[0.5]], [[0.0]]])   # a 1x1 stage: one number per channel
    assert _map_title("ch 0", act[0]) == "ch 0 = 4.10 (1x1)"
    assert _one_pixel_scale(act) == {"vmin": 0.0, "vmax": pytest.approx(4.1)}   # 0.5 is not drawn as the top colour
    assert _map_title("ch 0", torch.ones(2, 2)) == "ch 0" and _one_pixel_scale(torch.ones(3, 2, 2)) == {}
