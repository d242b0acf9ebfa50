"""The one place that finds and loads checkpoints, for every entry point (eval, predict, export, see, resume).

A checkpoint is read with ``torch.load(weights_only=True)`` only: tensors and plain containers, never
code. visionsweep's checkpoints hold nothing else (hyper-parameters are plain dicts, lists and
scalars), so nothing is allow-listed. What the checkpoint says it is picks the module class: a
``"visionsweep": {"kind": ...}`` marker when present (the segmenter writes one), else its
hyper-parameters (a segmenter has ``decoder`` and ``encoder_depth``, a classifier ``backbone`` and
``num_classes``). Anything else — a pickle with code, a truncated or random file, another program's
checkpoint — is refused with one line: ``<path> is not a safe visionsweep checkpoint (<reason>)``.

``ckpt_path=latest`` is the newest ``checkpoints/last.ckpt`` under ``<log_dir>/<task>/`` that does
not belong to a debug run (``debug=...``), and is logged as one line naming the file.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionsweep.errors import ConfigError, VisionSweepError

log = logging.getLogger("visionsweep.checkpoints")
MARKER = "visionsweep"  # top-level checkpoint key: {"kind": "segmenter" | "classifier"}
KINDS = {"classifier": "visionsweep.models.classifier:ClassifierModule",
         "segmenter": "visionsweep.models.segmenter:SegmenterModule"}
RESUME_KEYS = ("epoch", "global_step", "loops", "optimizer_states")


class CheckpointError(ConfigError):
    """A file given as a checkpoint that visionsweep will not (or cannot) load (one-argument, like its base)."""


def unsafe(path: str | Path, reason: str) -> CheckpointError:
    """``<path> is not a safe visionsweep checkpoint (<reason>)``."""
    return CheckpointError(f"{path} is not a safe visionsweep checkpoint ({reason})")


@dataclass
class LoadedCheckpoint:
    """A checkpoint's model (CPU, eval mode) with where it came from."""

    model: Any
    path: Path
    kind: str
    run_dir: Path

    def train_config(self) -> Any:
        """The training run's composed ``config.yaml`` (an OmegaConf DictConfig), or None without one."""
        from omegaconf import OmegaConf

        cfg_file = self.run_dir / "config.yaml"
        return OmegaConf.load(cfg_file) if cfg_file.is_file() else None


def run_dir_of(ckpt_path: str | Path) -> Path:
    """The run dir a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` → ``<run>``)."""
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _debug_override(overrides: Any) -> bool:
    """Whether a list of Hydra overrides selects a debug preset (``debug=fast``, ``+debug=limit``...)."""
    for item in overrides if isinstance(overrides, list) else []:
        m = re.match(r"^[+~]*debug=(.*)$", str(item).strip())
        if m and _chosen(m.group(1)):
            return True
    return False


def _chosen(value: Any) -> bool:
    """Whether a config-group choice is set (not missing, null or none)."""
    return value is not None and str(value).strip().lower() not in ("", "null", "none")


def is_debug_run(run_dir: str | Path) -> bool:
    """Whether a run dir was a ``debug=...`` run, as its run.json or its .hydra/ files record it.

    ``.hydra/hydra.yaml`` also tells when an experiment chose the debug preset in its defaults.
    """
    import yaml

    run_dir = Path(run_dir)
    try:
        run = json.loads((run_dir / "run.json").read_text())
        if isinstance(run, dict) and (_chosen(run.get("debug")) and run.get("debug") is not False
                                      or _debug_override(run.get("overrides"))):
            return True
    except (OSError, ValueError):
        pass
    loaded = {}
    for name in ("overrides.yaml", "hydra.yaml"):
        try:
            loaded[name] = yaml.safe_load((run_dir / ".hydra" / name).read_text())
        except (OSError, yaml.YAMLError):
            loaded[name] = None
    choices: Any = loaded["hydra.yaml"]
    for key in ("hydra", "runtime", "choices"):
        choices = choices.get(key) if isinstance(choices, dict) else None
    return _debug_override(loaded["overrides.yaml"]) or (isinstance(choices, dict) and _chosen(choices.get("debug")))


def find_latest(log_dir: str | Path, task_name: str = "train") -> Path:
    """The newest ``last.ckpt`` under ``<log_dir>/<task_name>/`` (runs and sweep jobs), debug runs skipped.

    Raises:
        ConfigError: no such checkpoint (saying how many debug runs were skipped).
    """
    root = Path(str(log_dir)).expanduser() / task_name
    found = sorted(root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    usable = [p for p in found if not is_debug_run(run_dir_of(p))]
    if not usable:
        skipped = f" ({len(found)} in debug runs skipped)" if found else ""
        raise ConfigError(f"ckpt_path=latest: no checkpoints/last.ckpt under {root}{skipped}: "
                          "train first, or give ckpt_path=<run>/checkpoints/<name>.ckpt")
    return usable[-1].resolve()


def resolve(ckpt_path: Any, log_dir: str | Path = "runs", task_name: str = "train") -> Path:
    """The file ``ckpt_path`` names: a path (``~`` expanded) or ``latest``; ``latest`` is logged.

    Raises:
        ConfigError: no ckpt_path, a missing file, or no checkpoint for ``latest``.
    """
    if ckpt_path is None or str(ckpt_path).strip() == "":
        raise ConfigError("ckpt_path is required: ckpt_path=<run>/checkpoints/<name>.ckpt (or ckpt_path=latest)")
    if str(ckpt_path) == "latest":
        path = find_latest(log_dir, task_name)
        log.info("ckpt_path=latest → %s", path)
        return path
    path = Path(str(ckpt_path)).expanduser()
    if path.is_dir():
        raise ConfigError(f"ckpt_path '{ckpt_path}' is a folder: give a checkpoint file "
                          "(<run>/checkpoints/<name>.ckpt)")
    if not path.is_file():
        raise ConfigError(f"ckpt_path '{ckpt_path}' does not exist")
    return path.resolve()


def _why_unreadable(e: BaseException) -> str:
    """A short reason for a failed weights-only load (torch's own message is many lines)."""
    text = str(e)
    code = re.search(r"unsupported GLOBAL (\S+)", text)
    if code:
        return f"it would run code ({code.group(1)}), not just hold weights; refused"
    if isinstance(e, EOFError) or not text.strip():
        return "empty or truncated file"
    if "zip archive" in text or "central directory" in text or "truncated" in text.lower():
        return "truncated or corrupt file: its zip archive cannot be read"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("Check the doc", "Please file"))]
    if "Weights only load failed" in text:
        detail = lines[-1] if lines and "Weights only load failed" not in lines[-1] else "not a tensor file"
        if re.match(r"Unsupported operand \d+", detail):  # the unpickler's view of a text or foreign file
            return "not a PyTorch file: not a zip archive, nor a pickle that weights-only loading can read"
        return f"not a weights-only PyTorch file: {detail.rstrip('.')}"
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def read(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of ``path``, read weights-only on the CPU, checked to be visionsweep's.

    Raises:
        CheckpointError: code in the pickle, an unreadable file, or content that is not a visionsweep checkpoint.
    """
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: the message below says it all
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every unreadable file is the same user error
        raise unsafe(path, _why_unreadable(e)) from None
    if not isinstance(ck, dict) or not isinstance(ck.get("state_dict"), dict) \
            or not isinstance(ck.get("hyper_parameters"), dict):
        raise unsafe(path, "no state_dict and hyper_parameters: not written by visionsweep.train")
    return ck


def kind_of(ck: dict[str, Any], path: str | Path = "checkpoint") -> str:
    """``classifier`` or ``segmenter``: the marker if the checkpoint has one, else its hyper-parameters."""
    marker = ck.get(MARKER)
    if isinstance(marker, dict) and marker.get("kind") is not None:
        if marker["kind"] not in KINDS:
            raise unsafe(path, f"unknown model kind '{marker['kind']}'")
        return str(marker["kind"])
    hp = ck.get("hyper_parameters") or {}
    if {"decoder", "encoder_depth", "backbone", "num_classes"} <= set(hp):
        return "segmenter"
    if {"backbone", "num_classes"} <= set(hp):
        return "classifier"
    raise unsafe(path, "its hyper_parameters describe neither a visionsweep classifier nor a segmenter")


def module_class(kind: str) -> type:
    """The LightningModule class of a kind (imported only when needed: smp is slow to import)."""
    import importlib

    module, name = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def build(ck: dict[str, Any], kind: str, path: str | Path = "checkpoint") -> Any:
    """The module of ``kind`` made from the checkpoint's hyper-parameters and weights (CPU, eval mode).

    Hub or local pretrained weights are never fetched: the checkpoint's own weights replace them.
    """
    cls = module_class(kind)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    hp = {k: v for k, v in ck["hyper_parameters"].items() if k in accepted}  # as load_from_checkpoint does
    hp.update(pretrained=False, pretrained_file=None)
    try:
        model = cls(**hp)
    except (TypeError, ValueError, VisionSweepError) as e:
        raise unsafe(path, f"its hyper_parameters do not build a {kind}: {_first_line(e)}") from None
    try:
        model.on_load_checkpoint(ck)  # as Lightning's load_from_checkpoint does, before the weights
        model.load_state_dict(ck["state_dict"], strict=True)
    except RuntimeError as e:
        raise unsafe(path, f"its weights do not fit the {kind} its hyper_parameters describe: "
                                    f"{_first_line(e)}") from None
    return model.eval()


def load(ckpt_path: Any, log_dir: str | Path = "runs", kind: str | None = None,
         task_name: str = "train") -> LoadedCheckpoint:
    """Resolve, read (weights-only) and build a checkpoint's model.

    Args:
        ckpt_path: a checkpoint file, or ``latest``.
        log_dir: where ``latest`` looks (``<log_dir>/<task_name>/``).
        kind: ``classifier`` or ``segmenter`` when only one makes sense (ConfigError for the other).
        task_name: the runs ``latest`` looks at.

    Raises:
        ConfigError: a missing file or no ``latest`` checkpoint; CheckpointError for an unsafe or bad file.
    """
    path = resolve(ckpt_path, log_dir, task_name)
    ck = read(path)
    got = kind_of(ck, path)
    if kind is not None and got != kind:
        raise ConfigError(f"ckpt_path '{path}' holds a {got}, but this needs a {kind} checkpoint")
    _warn_uncalibrated(ck, path)
    return LoadedCheckpoint(build(ck, got, path), path, got, run_dir_of(path))


def _warn_uncalibrated(ck: dict[str, Any], path: Path) -> None:
    """Warn when a run calibrated its best checkpoint and this is another one of its files (e.g. last.ckpt)."""
    t = (ck.get("state_dict") or {}).get("temperature")
    if t is not None and float(t) != 1.0:
        return
    try:
        record = json.loads((run_dir_of(path) / "run.json").read_text())
    except (OSError, ValueError):
        return
    calibration = record.get("calibration") if isinstance(record, dict) else None
    if isinstance(calibration, dict) and isinstance(calibration.get("temperature"), (int, float)):
        log.warning("%s has no temperature (T = 1): its run calibrated only its best checkpoint (T = %s): "
                    "ckpt_path=%s gives the calibrated probabilities", path, calibration["temperature"],
                    record.get("best_checkpoint") or "<the best checkpoint>")


def check_resumable(ckpt_path: Any, log_dir: str | Path, task_name: str, kind: str | None = None) -> Path:
    """The checkpoint to resume training from, checked weights-only before Lightning reads it.

    Raises:
        ConfigError: as :func:`load`, or a checkpoint without the training state a resume needs.
    """
    path = resolve(ckpt_path, log_dir, task_name)
    ck = read(path)
    got = kind_of(ck, path)
    if kind is not None and got != kind:
        raise ConfigError(f"ckpt_path '{path}' holds a {got}, but this run trains a {kind}")
    missing = [k for k in RESUME_KEYS if k not in ck]
    if missing:
        raise ConfigError(f"ckpt_path '{path}' has no training state to resume ({', '.join(missing)} missing): "
                          f"start a new run from its weights with model.pretrained_file={path}")
    return path


def is_segmenter(model: Any) -> bool:
    """Whether a built module is a SegmenterModule (its ``KIND`` says so; no smp import needed to ask)."""
    return getattr(model, "KIND", "classifier") == "segmenter"


def kind_of_target(target: Any) -> str:
    """The kind a ``model._target_`` trains (the segmenter's class, else a classifier)."""
    return "segmenter" if str(target or "").endswith("SegmenterModule") else "classifier"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
