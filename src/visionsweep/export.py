"""Export a checkpoint: ``python -m visionsweep.export ckpt_path=<run>/checkpoints/x.ckpt format=onnx|torchscript|state_dict``.

onnx / torchscript: a model that takes a batch of RGB images ``N x 3 x S x S`` (``input_dtype``: uint8
0..255, or float32 with the same 0..255 values) and returns logits (or probabilities with
``softmax=true``), per pixel (``N x classes x S x S``) for a segmentation checkpoint; normalisation
is inside the model. The images must be prepared as in training's
eval view: resize the short side to ``round(S / crop_pct)`` (``interpolation``), centre-crop ``S x S``.
A sidecar ``<name>.json`` records all of it plus the class names. The export is checked against the
checkpoint on random images (max abs difference ≤ ``tolerance``), and an ONNX file is timed through
onnxruntime (``time=true``: latency at batch 1 on the CPU, the median of up to 30 calls, into the sidecar's ``cost``).

state_dict: the backbone's (a segmenter's: its timm encoder's) weights as ``.safetensors``, to start another run from them with
``model.pretrained_file=<file>`` (how the offline fine-tune demo gets its "pretrained" weights).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from visionsweep import checkpoints, runinfo
from visionsweep.errors import ConfigError
from visionsweep.utils import checks
from visionsweep.utils.atomic import atomic_write, tmp_path
from visionsweep.utils.cli import guarded, precheck
from visionsweep.utils.atomic import check_output_file

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "state_dict": ".safetensors"}


def _opset(value: Any, key: str) -> int:
    import onnx  # the newest opset this onnx knows

    return checks.whole(value, key, 7, onnx.defs.onnx_opset_version(), 18)


#: export's own numeric keys and flags → their check
VALUES = {"opset": _opset, "tolerance": lambda v, k: checks.number(v, k, 0, None, 1e-4, low_open=True),
          "softmax": checks.flag, "check": checks.flag, "time": checks.flag}


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path`` as ``cfg.format``; returns the sidecar (with ``path`` and ``max_abs_diff``)."""
    fmt = str(cfg.format)
    if fmt not in SUFFIX:
        raise ConfigError(f"format={fmt}: use onnx, torchscript or state_dict")
    if cfg.input_dtype not in ("uint8", "float32"):
        raise ConfigError(f"input_dtype={cfg.input_dtype}: use uint8 or float32")
    checks.keys(cfg, VALUES)
    ckpt = checkpoints.resolve(cfg.ckpt_path, cfg.paths.log_dir)
    out_dir = Path(cfg.paths.output_dir)
    path = Path(cfg.output).expanduser() if cfg.get("output") else out_dir / f"model{SUFFIX[fmt]}"
    side = path.with_suffix(".json")
    if side == path:
        raise ConfigError(f"output={path}: a .json name is the sidecar's; give a {SUFFIX[fmt]} file name")
    for target in (path, side):  # checked before anything is read or written
        check_output_file(target, inputs=[ckpt], overwrite=bool(cfg.get("overwrite")), ours=_ours(path))
    loaded = checkpoints.load(ckpt, cfg.paths.log_dir)
    model = loaded.model
    tmp = tmp_path(path)  # written beside the target, renamed into place once checked: never half a model
    try:
        info = _write(cfg, fmt, loaded, tmp)
        if fmt == "onnx" and checks.flag(cfg.get("time", True), "time"):
            from visionsweep.cost import onnx_cost

            info.update(onnx_cost(tmp, int(model.hparams.image_size)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    info["path"] = str(path)
    if fmt == "state_dict":
        info["use"] = f"model.backbone={model.hparams.backbone} model.pretrained_file={path}"
    atomic_write(side, json.dumps(info, indent=2))
    runinfo.RunRecord(out_dir, task="export", **{k: v for k, v in info.items() if k != "format"},
                      export_format=fmt).finish(runinfo.Status.OK)
    check = f", max abs diff {info['max_abs_diff']:.2e}" if "max_abs_diff" in info else ""
    print(f"\n{fmt}: {path} (+ {path.with_suffix('.json').name}){check}", flush=True)
    return info


def _write(cfg: DictConfig, fmt: str, loaded: checkpoints.LoadedCheckpoint, path: Path) -> dict[str, Any]:
    """Write the model as ``fmt`` to ``path`` (checked against the checkpoint); returns the sidecar."""
    # (torch is heavy: imported with these, after main() checked the command line)
    from visionsweep.models.deploy import Deployable, max_abs_diff, random_images, sidecar, to_onnx, to_torchscript

    model, ckpt = loaded.model, loaded.path
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "state_dict":
        from safetensors.torch import save_file

        # a segmenter's timm encoder weights: the same keys as the backbone of a classifier
        net = model.net.encoder.model if loaded.kind == "segmenter" else model.net
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
        return {"format": fmt, "checkpoint": str(ckpt), "backbone": model.hparams.backbone,
                "class_names": list(model.class_names)}
    wrapper = Deployable(model, bool(cfg.softmax)).eval()
    size = int(model.hparams.image_size)
    example = random_images(2, size, cfg.input_dtype)
    if fmt == "onnx":
        to_onnx(wrapper, example, path, int(cfg.opset))
    else:
        to_torchscript(wrapper, example, path)
    info = sidecar(model, fmt, cfg.input_dtype, bool(cfg.softmax), ckpt)
    if cfg.check:
        diff = max_abs_diff(wrapper, path, fmt, random_images(3, size, cfg.input_dtype, seed=1))
        info["max_abs_diff"] = diff
        if diff > float(cfg.tolerance):
            raise ConfigError(f"the {fmt} export differs from the checkpoint by {diff:.2e} "
                              f"(> tolerance={cfg.tolerance}); try another opset or format")
    return info


def _ours(path: Path) -> Callable[[Path], bool]:
    """An earlier export to ``path``: its sidecar (``<name>.json``) is ours and names ``path``."""
    def ours(target: Path) -> bool:
        try:
            info = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(info, dict) and info.get("path") == str(path) and "format" in info \
            and (target == path.with_suffix(".json") or path.is_file())

    return ours


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@guarded
def _hydra_main(cfg: DictConfig) -> None:
    export(cfg)


def main() -> None:
    """Console entry point."""
    precheck("export")
    _hydra_main()


if __name__ == "__main__":
    main()
