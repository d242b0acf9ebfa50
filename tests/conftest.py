"""Shared fixtures: offline settings, a generated shapes set, and Hydra configs for in-process runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# before anything imports albumentations / wandb: no update checks, never the network
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# `make test` runs the tests in parallel (pytest-xdist, one worker per core): each worker takes its share of
# the cores before torch is imported, as two torch processes with every core's threads slow each other 5-30x
if "OMP_NUM_THREADS" not in os.environ and (workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """Pin every test (and the processes tests start) to the CPU unless the GPU tests were asked for.

    ``trainer.accelerator: auto`` would otherwise put the exact-equality tests (resume, re-run) on a
    CUDA host's GPU, where they assert something else. ``pytest -m gpu`` keeps the GPUs visible.
    """
    expr = (config.getoption("markexpr", "") or "").replace(" ", "")
    if "gpu" not in expr or "notgpu" in expr:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
CONF = REPO / "conf"


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small generated circle/square/triangle folder data set (shared, read-only)."""
    from visionsweep.data.builtin import write_shapes

    return write_shapes(tmp_path_factory.mktemp("data") / "shapes", n_per_class=60, size=32, seed=0)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """scikit-learn's 1,797 real 8x8 digits exported as a folder set (what `make train` uses)."""
    from visionsweep.data.builtin import export_digits

    return export_digits(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, digits_root) -> tuple[Path, dict]:
    """One short classifier run shared by the modules that need a trained checkpoint and do not change it
    (train, predict/export): resnet10t on the digits at 32 px, 2 epochs, seed 1, its plots drawn as a single
    run's are. Returns (run dir, metrics)."""
    from visionsweep.train import train

    out = tmp_path_factory.mktemp("digits_run")
    metrics = train(compose_cfg(out, [*FAST, "data=digits", f"data.root={digits_root}", "trainer.max_epochs=2",
                                      "seed=1", "plots=auto"]))
    return out, metrics


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (2 on 2 shared cores measured ~15x slower): an in-process
    train() sets no threads itself (the ThreadBudget Hydra callback does, for the CLI), and a CLI run started
    from these tests inherits OMP_NUM_THREADS."""
    import torch

    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


def compose_cfg(output_dir: Path, overrides: list[str], config_name: str = "train"):
    """Compose a config as the CLI would and point its run dir at ``output_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.root_dir = str(REPO)
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_cli(module: str, *args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m visionsweep.<module> args`` as a user would."""
    return subprocess.run([sys.executable, "-m", f"visionsweep.{module}", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


# tiny and fast: resnet10t (timm's smallest ResNet, 5 M parameters) at 32 px, a few epochs, no wandb unless a
# test asks for it; on the digits it trains in ~60 % of resnet18's time and reaches a higher accuracy
FAST = ["model=resnet10t", "data=shapes", "data.image_size=32", "augmentation=none",
        "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "plots=false"]
