"""The scaling lines of ``make bench`` (called by bench.py): a sweep sequential vs joblib, DDP 1 vs 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable


def bench_sweep(a, out: Path | None, emit: Callable, repo: Path) -> dict:
    """The same 4-job sweep run by the basic launcher and by joblib (n_jobs=2), threads=1 for both."""
    from visionsweep.data.builtin import export_digits
    from visionsweep.parallel import node_cores

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    keys = ("train/loss", "val/loss", "val/acc", "val/acc_best", "test/acc")
    with tempfile.TemporaryDirectory() as tmp:
        digits = export_digits(Path(tmp) / "digits")
        args = [sys.executable, "-m", "visionsweep.train", "-m", f"data.root={digits}", "data=digits",
                f"model={a.sweep_model}", f"data.image_size={a.sweep_size}", "augmentation=light", "logger=csv",
                f"trainer.max_epochs={a.sweep_epochs}", f"trainer.limit_train_batches={a.sweep_batches}",
                "trainer.enable_progress_bar=false", "data.verify_images=false", "seed=1,2,3,4", "++threads=1"]
        seconds, metrics = {}, {}
        for name, extra in (("sequential", []), ("joblib", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])):
            sweep = Path(tmp) / name
            start = time.time()
            proc = subprocess.run(args + extra + [f"hydra.sweep.dir={sweep}"], cwd=repo, capture_output=True,
                                  text=True, env=env)
            seconds[name] = time.time() - start
            if proc.returncode != 0:
                raise RuntimeError(f"{name} sweep failed: {proc.stderr[-2000:]}")
            runs = [json.loads((sweep / str(i) / "run.json").read_text()) for i in range(4)]
            metrics[name] = [{k: r.get("metrics", {}).get(k) for k in keys} for r in runs]
    return emit({"name": "sweep_joblib_ratio", "ratio": round(seconds["sequential"] / seconds["joblib"], 2),
                 "goal": 1.5, "identical": metrics["sequential"] == metrics["joblib"],
                 "sequential_s": round(seconds["sequential"], 1), "joblib_s": round(seconds["joblib"], 1),
                 "jobs": 4, "n_jobs": 2, "threads": 1, "cores": node_cores(), "device": "cpu"}, out)


def bench_ddp(a, out: Path | None, emit: Callable, repo: Path) -> dict:
    """One job as a single process and as ``trainer=ddp trainer.devices=2`` (gloo on CPU): the speed ratio, and
    whether both end at the same val acc (within 0.03: ``data.batch_size`` is the global batch)."""
    from visionsweep.data.builtin import export_digits
    from visionsweep.parallel import node_cores

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("OMP_NUM_THREADS", None)  # threads=auto: both cores for the single process, one per DDP rank
    with tempfile.TemporaryDirectory() as tmp:
        digits = export_digits(Path(tmp) / "digits")
        args = [sys.executable, "-m", "visionsweep.train", f"data.root={digits}", "data=digits",
                f"model={a.sweep_model}", f"data.image_size={a.sweep_size}", "augmentation=light", "logger=csv",
                f"trainer.max_epochs={a.sweep_epochs}", "trainer.enable_progress_bar=false",
                "data.verify_images=false", "test=false", "seed=1"]
        seconds, acc, threads = {}, {}, {}
        for name, extra in (("single", []), ("ddp2", ["trainer=ddp", "trainer.devices=2"])):
            run = Path(tmp) / name
            proc = subprocess.run(args + extra + [f"hydra.run.dir={run}"], cwd=repo, capture_output=True,
                                  text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} run failed: {proc.stderr[-2000:]}")
            record = json.loads((run / "run.json").read_text())
            seconds[name] = record["fit_seconds"]  # fit only: both pay the same start-up
            acc[name], threads[name] = record["metrics"].get("val/acc_best"), record.get("threads")
    # data.batch_size is the global batch (each rank loads half): the result must not depend on the ranks
    diff = abs(acc["single"] - acc["ddp2"]) if None not in (acc["single"], acc["ddp2"]) else None
    return emit({"name": "ddp_ratio", "ratio": round(seconds["single"] / seconds["ddp2"], 2),
                 "single_fit_s": seconds["single"], "ddp2_fit_s": seconds["ddp2"], "val_acc_best": acc,
                 "val_acc_diff": None if diff is None else round(diff, 4), "acc_tolerance": 0.03,
                 "same_result": diff is not None and diff <= 0.03,
                 "threads": threads, "cores": node_cores(), "model": a.sweep_model, "device": "cpu"}, out)
