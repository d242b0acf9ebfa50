"""Export a checkpoint: ``python -m visionsweep.export ckpt_path=<run>/checkpoints/x.ckpt format=onnx|torchscript|state_dict``.

onnx / torchscript: a model that takes a batch of RGB images ``N x 3 x S x S`` (``input_dtype``: uint8
0..255, or float32 with the same 0..255 values) and returns logits (or probabilities with
``softmax=true``); normalisation is inside the model. The images must be prepared as in training's
eval view: resize the short side to ``round(S / crop_pct)`` (``interpolation``), centre-crop ``S x S``.
A sidecar ``<name>.json`` records all of it plus the class names. The export is checked against the
checkpoint on random images (max abs difference ≤ ``tolerance``).

state_dict: the backbone's weights as ``.safetensors``, to start another run from them with
``model.pretrained_file=<file>`` (how the offline fine-tune demo gets its "pretrained" weights).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn as nn
from omegaconf import DictConfig

from visionsweep import runinfo
from visionsweep.errors import ConfigError
from visionsweep.models.classifier import ClassifierModule
from visionsweep.predict import load_classifier
from visionsweep.utils.cli import guarded, precheck

log = logging.getLogger("visionsweep.export")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "state_dict": ".safetensors"}


class Deployable(nn.Module):
    """The classifier as one function of raw pixels: ``N x 3 x S x S`` (0..255) → logits/probabilities."""

    def __init__(self, model: ClassifierModule, softmax: bool = False) -> None:
        super().__init__()
        self.net = model.net
        self.register_buffer("scale", model.scale.clone())
        self.register_buffer("shift", model.shift.clone())
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x.float() * self.scale + self.shift)
        return out.softmax(dim=1) if self.softmax else out


def sidecar(model: ClassifierModule, fmt: str, input_dtype: str, softmax: bool, ckpt: Path) -> dict[str, Any]:
    """What a user of the exported file needs to know to feed it and read its output."""
    hp = model.hparams
    size = int(hp.image_size)
    return {
        "format": fmt, "checkpoint": str(ckpt), "backbone": hp.backbone, "class_names": list(model.class_names),
        "input": {"name": "image", "shape": ["N", 3, size, size], "layout": "NCHW", "channels": "RGB",
                  "dtype": input_dtype, "range": [0, 255], "normalisation": "inside the model"},
        "preprocessing": {"resize_short_side": max(size, round(size / float(hp.crop_pct))),
                          "interpolation": hp.interpolation, "center_crop": size, "crop_pct": hp.crop_pct,
                          "mean": list(hp.mean), "std": list(hp.std),
                          "formula": "(pixel / 255 - mean) / std, applied by the model"},
        "output": {"name": "probabilities" if softmax else "logits", "shape": ["N", len(model.class_names)]},
    }


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path`` as ``cfg.format``; returns the sidecar (with ``path`` and ``max_abs_diff``)."""
    fmt = str(cfg.format)
    if fmt not in SUFFIX:
        raise ConfigError(f"format={fmt}: use onnx, torchscript or state_dict")
    if cfg.input_dtype not in ("uint8", "float32"):
        raise ConfigError(f"input_dtype={cfg.input_dtype}: use uint8 or float32")
    model, ckpt = load_classifier(cfg.ckpt_path, cfg.paths.log_dir)
    out_dir = Path(cfg.paths.output_dir)
    path = Path(cfg.output).expanduser() if cfg.get("output") else out_dir / f"model{SUFFIX[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "state_dict":
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in model.net.state_dict().items()}, str(path))
        info: dict[str, Any] = {"format": fmt, "checkpoint": str(ckpt), "backbone": model.hparams.backbone,
                                "class_names": list(model.class_names),
                                "use": f"model.backbone={model.hparams.backbone} model.pretrained_file={path}"}
    else:
        wrapper = Deployable(model, bool(cfg.softmax)).eval()
        size = int(model.hparams.image_size)
        example = _images(2, size, cfg.input_dtype)
        if fmt == "onnx":
            _to_onnx(wrapper, example, path, int(cfg.opset))
        else:
            with torch.no_grad():
                torch.jit.trace(wrapper, example).save(str(path))
        info = sidecar(model, fmt, cfg.input_dtype, bool(cfg.softmax), ckpt)
        if cfg.check:
            diff = max_abs_diff(wrapper, path, fmt, _images(3, size, cfg.input_dtype, seed=1))
            info["max_abs_diff"] = diff
            if diff > float(cfg.tolerance):
                raise ConfigError(f"the {fmt} export differs from the checkpoint by {diff:.2e} "
                                  f"(> tolerance={cfg.tolerance}); try another opset or format")
    info["path"] = str(path)
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    runinfo.RunRecord(out_dir, task="export", status="ok", **{k: v for k, v in info.items() if k != "format"},
                      export_format=fmt)
    check = f", max abs diff {info['max_abs_diff']:.2e}" if "max_abs_diff" in info else ""
    print(f"\n{fmt}: {path} (+ {path.with_suffix('.json').name}){check}", flush=True)
    return info


def _images(n: int, size: int, dtype: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return x if dtype == "uint8" else x.float()


def _to_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
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
            got = torch.jit.load(str(path))(x)
    return float((got - ref).abs().max())


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
@guarded
def _hydra_main(cfg: DictConfig) -> None:
    export(cfg)


def main() -> None:
    """Console entry point."""
    precheck("export")
    _hydra_main()


if __name__ == "__main__":
    main()
