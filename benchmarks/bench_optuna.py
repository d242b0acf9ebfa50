"""The ``optuna_unbatched`` line of ``make bench`` (called by bench.py): a parallel Optuna study, batched vs not.

6 trials whose lengths differ ~4x (``trainer.max_epochs=choice(1,4)``) at ``hydra.sweeper.n_jobs=2`` through
joblib, once with ``hydra.sweeper.batched=true`` (ask 2, wait for both: Hydra's optuna sweeper) and once
without (a new trial as soon as one ends). Each is measured against the ideal: the jobs' summed run times
(``finished - started`` in their run.json) / 2. The wall clock is the first job's start to the last job's
end, so process start-up (the same for both) is not counted. Goal: unbatched <= 1.2x the ideal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

TRIALS, SLOTS, CHOICES = 6, 2, (1, 4)


def _seed_with_both_lengths() -> int:
    """A RandomSampler seed whose 6 asks hold both lengths, 3 of each (both modes ask the same sequence)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"trainer.max_epochs": optuna.distributions.CategoricalDistribution(list(CHOICES))}
    for seed in range(200):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        asked = [study.ask(space).params["trainer.max_epochs"] for _ in range(TRIALS)]
        if asked.count(CHOICES[0]) == TRIALS // 2 and asked[0] != asked[1]:
            return seed
    raise RuntimeError("no RandomSampler seed gives mixed trial lengths")


def bench_optuna(a, out: Path | None, emit: Callable, repo: Path) -> dict:
    """The same 6-trial study, batched and unbatched, at 2 trials in flight."""
    from visionsweep.data.builtin import export_digits
    from visionsweep.parallel import node_cores

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    seed, result = _seed_with_both_lengths(), {}
    with tempfile.TemporaryDirectory() as tmp:
        digits = export_digits(Path(tmp) / "digits")
        args = [sys.executable, "-m", "visionsweep.train", "-m", f"data.root={digits}", "data=digits",
                f"model={a.sweep_model}", f"data.image_size={a.sweep_size}", "augmentation=light", "logger=csv",
                f"trainer.limit_train_batches={a.sweep_batches}", "trainer.enable_progress_bar=false",
                "data.verify_images=false", "test=false", "++threads=1", "optimized_metric=val/acc_best",
                "hydra/sweeper=visionsweep_optuna", f"hydra.sweeper.n_trials={TRIALS}",
                f"hydra.sweeper.n_jobs={SLOTS}", "hydra.sweeper.sampler.name=random",
                f"hydra.sweeper.sampler.seed={seed}", f"trainer.max_epochs=choice({CHOICES[0]},{CHOICES[1]})",
                "hydra/launcher=joblib", f"hydra.launcher.n_jobs={SLOTS}"]
        for mode in ("batched", "unbatched"):
            sweep = Path(tmp) / mode
            start = time.time()
            proc = subprocess.run(args + [f"hydra.sweeper.batched={mode == 'batched'}", f"hydra.sweep.dir={sweep}"],
                                  cwd=repo, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{mode} study failed: {proc.stderr[-2000:]}")
            runs = [json.loads((sweep / str(i) / "run.json").read_text()) for i in range(TRIALS)]
            jobs = [(r["started"], r["finished"]) for r in runs]
            ideal = sum(e - s for s, e in jobs) / SLOTS
            wall = max(e for _, e in jobs) - min(s for s, _ in jobs)
            result[mode] = {"wall_s": round(wall, 1), "ideal_s": round(ideal, 1), "ratio": round(wall / ideal, 2),
                            "command_s": round(time.time() - start, 1), "epochs": [r["epochs"] for r in runs]}
    return emit({"name": "optuna_unbatched", "ratio": result["unbatched"]["ratio"], "goal": 1.2,
                 "batched_ratio": result["batched"]["ratio"], **result, "trials": TRIALS, "n_jobs": SLOTS,
                 "threads": 1, "cores": node_cores(), "device": "cpu"}, out)
