"""Optuna sweeps: trials in parallel on a launcher, and pruning of hopeless trials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from test_sweeps import TINY


def _study(sweep: Path):
    import optuna

    return optuna.load_study(study_name="optuna_lr", storage=f"sqlite:///{sweep / 'optuna.db'}")


@pytest.mark.scaling  # 8 short trials, 2 at a time (a pruned trial's slot takes the next trial at once)
def test_median_pruner_stops_hopeless_trials(tmp_path, digits_root):
    sweep = tmp_path / "prune"
    # lr 1e-7 learns nothing in 3 epochs, 3e-3 does; the pruner compares each epoch with the median
    proc = run_cli("train", "-m", "experiment=optuna_lr", *TINY, f"data.root={digits_root}", "trainer.max_epochs=3",
                   "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   "trainer.limit_train_batches=8", "hydra.sweeper.n_trials=8", "hydra.sweeper.pruner.name=median",
                   "hydra.sweeper.pruner.n_startup_trials=2", "hydra.sweeper.sampler.name=random",
                   "optimizer.lr=choice(1e-7, 3e-3)", "augmentation=choice(none)",  # join the space
                   f"hydra.sweep.dir={sweep}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = _study(sweep)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert len(study.trials) == 8 and len(pruned) >= 1, [(t.state.name, t.params) for t in study.trials]
    for t in pruned:  # the job stopped early, said so, and was not tested
        run = json.loads((sweep / str(t.number) / "run.json").read_text())
        assert run["status"] == "pruned" and run["epochs"] < 3 and "test/acc" not in run["metrics"]
        assert t.intermediate_values  # it reported per epoch before being stopped
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["n_pruned"] == len(pruned)
    assert run_cli("report", str(sweep)).returncode == 0
    assert f"{len(pruned)} pruned" in (sweep / "summary.md").read_text()


@pytest.mark.scaling  # two trials at once through joblib
def test_trials_run_in_parallel_on_joblib(tmp_path, digits_root):
    sweep = tmp_path / "parallel"
    proc = run_cli("train", "-m", "experiment=optuna_lr", *TINY, f"data.root={digits_root}",
                   "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib",
                   "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = _study(sweep)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    runs = [json.loads((sweep / str(i) / "run.json").read_text()) for i in (0, 1)]
    assert all(r["status"] == "ok" and r["threads"] == 1 for r in runs)  # 2 cores / 2 jobs at once
    assert {t.value for t in study.trials} == {r["metrics"]["val/acc_best"] for r in runs}
