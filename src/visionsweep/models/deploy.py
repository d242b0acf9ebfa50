"""A classifier or segmenter as a deployable function of raw pixels, and the checks of an exported file."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from visionsweep.checkpoints import is_segmenter
from visionsweep.models import PixelNormalize

log = logging.getLogger("visionsweep.export")


class Deployable(nn.Module):
    """A checkpoint's model as one function of raw pixels: ``N x 3 x S x S`` (0..255) → logits/probabilities.

    A classifier gives ``N x classes``; a segmenter ``N x classes x S x S`` (padded to its encoder's
    stride inside, as in training). Normalisation is part of the exported graph.
    """

    def __init__(self, model: nn.Module, softmax: bool = False) -> None:
        super().__init__()
        self.net = model.net
        self.pixels = PixelNormalize(model.hparams.mean, model.hparams.std)  # exported with the net
        self.softmax = softmax
        self.register_buffer("temperature", getattr(model, "temperature", torch.ones(())).detach().clone().reshape(()))
        self.multilabel = bool(getattr(model, "multilabel", False))  # probabilities: one sigmoid per class
        self.segment = is_segmenter(model)
        self.stride = int(getattr(model, "stride", 1))
        if self.segment:
            from visionsweep.models.segmenter import padded_logits

            self._padded = padded_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._padded(self.net, self.pixels, self.stride, x) if self.segment else self.net(self.pixels(x))
        if not self.softmax:
            return out
        return out.sigmoid() if self.multilabel else (out / self.temperature).softmax(dim=1)


def sidecar(model: nn.Module, fmt: str, input_dtype: str, softmax: bool, ckpt: Path) -> dict[str, Any]:
    """What a user of the exported file needs to know to feed it and read its output."""
    hp = model.hparams
    size, n = int(hp.image_size), len(model.class_names)
    output: dict[str, Any] = {"name": "probabilities" if softmax else "logits", "shape": ["N", n]}
    t = float(getattr(model, "temperature", 1.0))
    if not getattr(model, "multilabel", False) and not is_segmenter(model):
        output["temperature"] = round(t, 6)
        output["activation"] = (f"softmax(logits / {t:.4g})" if softmax else
                                f"none (logits; probabilities = softmax(logits / {t:.4g}), the fitted temperature)")
    if getattr(model, "multilabel", False):
        output = {**output, "multilabel": True, "activation": "sigmoid per class" if softmax else "none (logits)",
                  "thresholds": [round(float(t), 6) for t in model.thresholds],
                  "decision": "class c is present when its probability >= thresholds[c] (tuned on validation)"}
    if is_segmenter(model):
        output = {**output, "shape": ["N", n, size, size],
                  "mask": "argmax over dim 1 gives each pixel's class index"}
    return {
        "format": fmt, "checkpoint": str(ckpt), "kind": "segmenter" if is_segmenter(model) else "classifier",
        "backbone": hp.backbone, "class_names": list(model.class_names),
        "input": {"name": "image", "shape": ["N", 3, size, size], "layout": "NCHW", "channels": "RGB",
                  "dtype": input_dtype, "range": [0, 255], "normalisation": "inside the model"},
        "preprocessing": {"resize_short_side": max(size, round(size / float(hp.crop_pct))),
                          "interpolation": hp.interpolation, "center_crop": size, "crop_pct": hp.crop_pct,
                          "mean": list(hp.mean), "std": list(hp.std),
                          "formula": "(pixel / 255 - mean) / std, applied by the model"},
        "output": output,
    }


def random_images(n: int, size: int, dtype: str, seed: int = 0) -> torch.Tensor:
    """``n`` random RGB images (the export's example and check input)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return x if dtype == "uint8" else x.float()


def to_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path) -> None:
    """TorchScript by tracing ``example``; PyTorch deprecates TorchScript, which one log line says (not its
    FutureWarnings from our own trace)."""
    log.info("format=torchscript: PyTorch deprecates TorchScript (torch.jit); format=onnx is the lasting one")
    with torch.no_grad(), warnings.catch_warnings():
        # the segmenter's pad-to-stride test is fixed at trace time; the S x S input makes it right
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", r".*is deprecated", FutureWarning)
        torch.jit.trace(wrapper, example).save(str(path))


def to_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """ONNX with a dynamic batch dimension (torch.onnx's dynamo exporter)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(wrapper, (example,), str(path), input_names=["image"],
                          output_names=["output"], opset_version=opset, dynamo=True, external_data=False,
                          dynamic_shapes={"x": {0: batch}}, verbose=False)


def max_abs_diff(wrapper: nn.Module, path: Path, fmt: str, x: torch.Tensor) -> float:
    """Largest absolute difference between the exported file's outputs and the PyTorch model's on ``x``."""
    with torch.no_grad():
        ref = wrapper(x)
        if fmt == "onnx":
            import onnxruntime as ort

            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        else:
            with warnings.catch_warnings():  # torch.jit.load "is deprecated": export says so once, as a log line
                warnings.filterwarnings("ignore", r".*is deprecated", FutureWarning)
                got = torch.jit.load(str(path))(x)
    return float((got - ref).abs().max())
