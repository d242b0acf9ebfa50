"""What ``tools/gpu_wheels.py`` and ``tools/gpu_check.py`` share: the GPU image, names, output, subprocesses.

Standard library only (the check imports it before anything of ours is installed). Both scripts import it
from their own folder, which is on ``sys.path`` when a script is run by path.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What a bare PyTorch GPU image already holds (with whatever these need): never shipped as wheels.
IMAGE_HAS = (
    "torch", "torchvision", "pytorch-lightning", "lightning", "torchmetrics", "timm", "opencv-python-headless",
    "onnx", "onnxruntime", "onnxscript", "scikit-learn", "scipy", "matplotlib", "tensorboard", "safetensors",
    "huggingface-hub", "rich", "pyyaml", "numpy", "pandas", "pillow", "joblib", "filelock", "psutil", "tqdm",
    "pytest", "pytest-xdist", "pytest-timeout",
)
# Main dependencies that are optional in practice (a logger the run does not choose): not shipped, not needed.
NOT_SHIPPED = ("wandb", "mlflow", "mlflow-skinny", "mlflow-tracing", "ray")
# What must import from the prefix after the install (module: distribution).
MUST_IMPORT = {
    "hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime",
    "albumentations": "albumentations", "optuna": "optuna", "segmentation_models_pytorch":
    "segmentation-models-pytorch", "captum": "captum", "submitit": "submitit",
    "hydra_plugins.hydra_joblib_launcher": "hydra-joblib-launcher",
    "hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher",
}
NOISE = "is ignored: it is neither a file nor a directory"  # pip about this machine's file:// indexes


def canon(name: str) -> str:
    """PEP 503 normalised name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(filename: str) -> tuple[str, str]:
    """``(canonical name, version)`` of a wheel file name."""
    parts = Path(filename).name[:-len(".whl")].split("-")
    return canon(parts[0]), parts[1]


class Tee:
    """Lines to stdout and to the log file."""

    def __init__(self, path: Path | None) -> None:
        self.f = path.open("w", encoding="utf-8") if path else None
        self.lock = threading.Lock()

    def __call__(self, line: str = "") -> None:
        with self.lock:
            print(line, flush=True)
            if self.f:
                self.f.write(line + "\n")
                self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


def run(cmd: list[str], tee: Tee, timeout: float | None = None, **kw) -> tuple[int | None, list[str], float]:
    """Run ``cmd``; its output (stdout + stderr) goes to ``tee`` line by line.

    Returns ``(exit code or None on timeout, output lines, seconds)``; on timeout the whole process group is
    killed.
    """
    tee("$ " + " ".join(c if "\n" not in c else "'<script>'" for c in cmd))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True, **kw)
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if NOISE not in line:
                tee(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        tee(f"# timed out after {timeout:.0f} s: killed")
    reader.join(timeout=10)
    return rc, lines, time.monotonic() - start

