"""``make bench-fastai``: the default job (``python -m visionsweep.train``) vs fastai, side by side, per seed.

Both run on the same cores with the same threads (``taskset``), on the same split of the embedded digits
(fastai reads the split CSVs our run wrote). fastai: ``vision_learner(resnet34, pretrained=False)`` +
``fit_one_cycle(10, 1e-3)`` at 32 px, batch 64 (``fastai_digits.py``, run by ``--fastai-python``).
For ours, ``val`` is the final epoch's val/acc and ``test`` the final weights' (``last.ckpt`` through
``visionsweep.eval``): the end of the run, not its luckiest epoch. Prints a markdown table, then one JSON
line: ``fit_ratio`` = our fit seconds / fastai's (goal <= 0.5), mean and min accuracies.

    python benchmarks/vs_fastai.py --seeds 1,2,3 --cores 1 --threads 1 [-- <train overrides>]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cores: str, threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore"}
    pinned = ["taskset", "-c", cores, *cmd] if cores else cmd
    proc = subprocess.run(pinned, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd[:4])} … failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def ours(seed: int, run_dir: Path, cores: str, threads: int, overrides: list[str]) -> dict:
    """One default job; fit seconds from run.json, final val/acc from metrics.csv, test of last.ckpt."""
    py = sys.executable
    _run([py, "-m", "visionsweep.train", f"seed={seed}", f"hydra.run.dir={run_dir}", *overrides], cores, threads)
    info = json.loads((run_dir / "run.json").read_text())
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("val/acc")]
    evaluated = run_dir / "eval"
    _run([py, "-m", "visionsweep.eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
          f"hydra.run.dir={evaluated}"], cores, threads)
    test = json.loads((evaluated / "metrics.json").read_text())["test/acc"]
    return {"system": "visionsweep", "seed": seed, "fit_s": info["fit_seconds"], "epochs": len(rows),
            "val_acc": float(rows[-1]["val/acc"]), "test_acc": float(test),
            "val_acc_best": max(float(r["val/acc"]) for r in rows)}


def fastai(seed: int, run_dir: Path, python: str, cores: str, threads: int) -> dict:
    out = _run([python, str(REPO / "benchmarks" / "fastai_digits.py"), "--root", str(REPO / "data" / "digits"),
                "--splits", str(run_dir / "splits"), "--seed", str(seed), "--threads", str(threads)], cores, threads)
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--cores", default="1", help="taskset CPU list for both systems ('' = no pinning)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fastai-python", default=str(REPO / ".venv-fastai" / "bin" / "python"))
    p.add_argument("overrides", nargs="*", help="extra train overrides for our job (after --)")
    a = p.parse_args()
    rows: list[dict] = []
    (REPO / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "runs") as tmp:
        for seed in (int(s) for s in a.seeds.split(",")):
            run_dir = Path(tmp) / f"seed{seed}"
            rows.append(ours(seed, run_dir, a.cores, a.threads, a.overrides))
            rows.append(fastai(seed, run_dir, a.fastai_python, a.cores, a.threads))
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)
    print("\n| system | seed | fit s | final val acc | final test acc |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['seed']} | {r['fit_s']:.1f} | {r['val_acc']:.4f} | {r['test_acc']:.4f} |")
    by = {s: [r for r in rows if r["system"] == s] for s in ("visionsweep", "fastai")}
    mean = lambda s, k: statistics.mean(r[k] for r in by[s])  # noqa: E731
    print(json.dumps({"name": "vs_fastai", "fit_ratio": round(mean("visionsweep", "fit_s") / mean("fastai", "fit_s"), 3),
                      "goal": "<= 0.5, val and test >= 0.99 on every seed",
                      **{f"{s}_{k}": round(mean(s, k), 4) for s in by for k in ("fit_s", "val_acc", "test_acc")},
                      "visionsweep_min_val_acc": min(r["val_acc"] for r in by["visionsweep"]),
                      "visionsweep_min_test_acc": min(r["test_acc"] for r in by["visionsweep"]),
                      "cores": a.cores, "threads": a.threads}))


if __name__ == "__main__":
    main()
