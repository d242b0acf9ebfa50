"""What a model costs: parameters, multiply-adds, latency/throughput, peak memory, time to a target, ONNX speed."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn as nn

from visionsweep.cost import inference_speed, model_size, onnx_speed, peak_memory

pytestmark = pytest.mark.usefixtures("one_thread")


def _classifier(backbone: str = "resnet10t", size: int = 32):
    from visionsweep.models.classifier import ClassifierModule

    torch.manual_seed(0)
    return ClassifierModule(backbone=backbone, num_classes=3, image_size=size)


class _ConvHead(nn.Module):
    """uint8 images → one conv, global pooling, one linear layer (multiply-adds countable by hand)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)
        self.seen: list[tuple] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((tuple(x.shape), x.dtype))
        return self.fc(self.conv(x.float()).mean(dim=(2, 3)))


def test_macs_of_a_conv_and_a_linear_layer_are_exact():
    model = _ConvHead()
    size = 20
    conv = model.conv
    out_side = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1  # 10
    conv_macs = conv.out_channels * out_side * out_side * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    fc_macs = model.fc.in_features * model.fc.out_features
    got = model_size(model, size)
    assert got["macs"] == conv_macs + fc_macs == 8 * 100 * 27 + 40
    assert model.seen == [((1, 3, size, size), torch.uint8)]  # one batch-1 uint8 pass


def test_macs_grow_with_the_input_area_and_params_are_the_parameter_count():
    model = _classifier()
    small, big = model_size(model, 32), model_size(model, 64)
    assert big["macs"] == pytest.approx(4 * small["macs"], rel=0.01)  # 4x the pixels, ~4x the work
    n = sum(p.numel() for p in model.parameters())
    assert small["params"] == big["params"] == small["trainable_params"] == n
    for p in model.net.conv1.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.net.conv1.parameters())
    assert model_size(model, 32)["trainable_params"] == n - frozen > 0


def test_latency_is_positive_and_a_bigger_model_is_slower():
    small = inference_speed(_classifier("resnet10t"), 32, batch=4, calls=10, budget_s=2)
    big = inference_speed(_classifier("resnet34"), 32, batch=4, calls=10, budget_s=2)
    for r in (small, big):
        assert 0 < r["latency_ms"] <= r["latency_ms_p90"]
        assert r["throughput_img_s"] > 0 and r["throughput_batch"] == 4 and r["device"] == "cpu"
        assert r["latency_calls"] == r["throughput_calls"] == 10
    assert big["latency_ms"] > small["latency_ms"]  # resnet34: ~3x the multiply-adds of resnet10t
    assert json.loads(json.dumps(small)) == small


class _Slow(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return x.float().mean()


def test_a_slow_model_gets_fewer_timed_calls_but_never_fewer_than_five():
    r = inference_speed(_Slow(), 8, batch=0, calls=30, warmup=3, budget_s=0.1)
    assert r["latency_calls"] == 5 and r["latency_ms"] >= 20
    assert r["throughput_img_s"] is None and r["throughput_calls"] == 0


def test_the_train_eval_mode_of_every_module_is_restored():
    model = _classifier()
    model.train()
    model.net.bn1.eval()  # e.g. a fine-tune's frozen batch norm
    before = [m.training for m in model.modules()]
    model_size(model, 32)
    inference_speed(model, 32, batch=2, calls=5, warmup=1, budget_s=1)
    assert [m.training for m in model.modules()] == before
    model.eval()
    model_size(model, 32)
    assert not any(m.training for m in model.modules())


def test_peak_memory_on_the_cpu_is_the_process_rss():
    r = peak_memory("cpu")
    assert r["peak_mem_kind"] == "cpu_rss" and 10 < r["peak_mem_mb"] < 1e6
    assert peak_memory()["peak_mem_kind"] == peak_memory(torch.device("cpu"))["peak_mem_kind"] == "cpu_rss"
    assert json.loads(json.dumps(r)) == r


def test_peak_memory_units_on_linux_macos_and_cuda(monkeypatch):
    import resource
    import sys
    from types import SimpleNamespace

    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=3 * 1024 * 1024))
    monkeypatch.setattr(sys, "platform", "linux")
    assert peak_memory("cpu")["peak_mem_mb"] == 3072.0  # KiB on Linux
    monkeypatch.setattr(sys, "platform", "darwin")
    assert peak_memory("cpu")["peak_mem_mb"] == 3.0  # bytes on macOS
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * 2 ** 20 + 123)
    assert peak_memory("cuda:0") == {"peak_mem_mb": 5.0, "peak_mem_kind": "cuda_allocated"}


def test_onnx_speed_of_an_exported_uint8_classifier(tmp_path):
    from visionsweep.models.deploy import Deployable, random_images

    path = tmp_path / "model.onnx"
    wrapper = Deployable(_classifier()).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():  # as visionsweep.export writes it: uint8 input, dynamic batch
        torch.onnx.export(wrapper, (random_images(2, 32, "uint8"),), str(path), input_names=["image"],
                          dynamo=True, external_data=False, dynamic_shapes={"x": {0: batch}}, verbose=False)
    r = onnx_speed(path, 32, batch=2, calls=10, threads=1)
    assert r["onnx_latency_ms"] > 0 and r["onnx_calls"] == 10 and r["onnx_batch"] == 2
    assert r["onnx_throughput_img_s"] == pytest.approx(2000 / r["onnx_latency_ms"], rel=0.01)
    assert json.loads(json.dumps(r)) == r
    with pytest.raises(ValueError, match="input shape"):
        onnx_speed(path, 64, calls=5)  # a fixed 32 px graph cannot take 64 px


def test_onnx_speed_feeds_a_float32_fixed_batch_graph(tmp_path):
    path = tmp_path / "float.onnx"
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(3, 3, 16, 16),), str(path), input_names=["image"], dynamo=False)
    r = onnx_speed(path, 16, batch=1, calls=5, threads=1)
    assert r["onnx_batch"] == 3 and r["onnx_calls"] == 5 and r["onnx_latency_ms"] > 0  # the file's batch


def test_onnx_speed_without_onnxruntime_says_what_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when it is not installed
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        onnx_speed(tmp_path / "model.onnx", 32)
