"""Optuna sweeps: trials in parallel on a launcher, and pruning of hopeless trials."""

from __future__ import annotations

import json
import os
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
    # threads=auto under joblib: the cores this process may use, shared by the 2 jobs at once (at least 1
    # each), at most OMP_NUM_THREADS when the environment sets it
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    budget, pinned = max(1, cores // 2), os.environ.get("OMP_NUM_THREADS", "")
    budget = min(budget, int(pinned)) if pinned.isdigit() and int(pinned) > 0 else budget
    assert all(r["status"] == "ok" and r["threads"] == budget for r in runs), (budget, runs)
    assert {t.value for t in study.trials} == {r["metrics"]["val/acc_best"] for r in runs}


class _Constant:
    """A tiny LightningModule whose validation reports the same ``val/acc_best`` every epoch."""

    @staticmethod
    def fit(value: float, tmp_path: Path):
        import pytorch_lightning as pl
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        from visionsweep.callbacks.optuna_pruning import OptunaPruning

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.layer = torch.nn.Linear(2, 2)

            def training_step(self, batch, _):
                x, y = batch
                return torch.nn.functional.cross_entropy(self.layer(x), y)

            def validation_step(self, batch, _):
                self.log("val/acc_best", torch.tensor(value))

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = DataLoader(TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), batch_size=2)
        callback = OptunaPruning(monitor="val/acc_best")
        trainer = pl.Trainer(max_epochs=3, callbacks=[callback], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             accelerator="cpu", default_root_dir=tmp_path)
        trainer.fit(Module(), data, data)
        return callback, trainer


@pytest.mark.parametrize(("name", "value", "pruned"), [("percentile", 0.45, False), ("percentile", 0.3, True),
                                                       ("median", 0.45, True)])
def test_the_sweepers_pruner_is_the_one_the_job_asks_and_it_decides_the_stop(tmp_path, monkeypatch, name, value,
                                                                            pruned):
    """hydra.sweeper.pruner.name=percentile reaches the job (through the trial's environment), whose study
    then prunes with it: 4 finished trials reported 0.2, 0.4, 0.6, 0.8 at every epoch. percentile=75 keeps
    the top 75 % (Optuna's meaning: maximising, a trial below the 25th percentile, 0.35, is pruned); 0.45 lies
    above that and below their median (0.5), so the percentile pruner lets it run where the median pruner
    stops it; 0.3 is stopped by both."""
    import optuna
    from omegaconf import OmegaConf

    from hydra_plugins.visionsweep_optuna.optuna_sweeper import OptunaSweeper, PrunerConf, SamplerConf
    from visionsweep.callbacks.optuna_pruning import ENV, current_trial, make_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = OmegaConf.structured(PrunerConf(name=name, n_startup_trials=4, n_warmup_steps=0,
                                             percentile=75.0 if name == "percentile" else None))
    sweeper = OptunaSweeper(direction="maximize", n_trials=5, study_name="s", storage=None,
                            sampler=OmegaConf.structured(SamplerConf()), params=None, pruner=pruner)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize",
                                pruner=make_pruner(sweeper.pruner_cfg))  # as the sweeper creates it
    for v in (0.2, 0.4, 0.6, 0.8):
        study.add_trial(optuna.trial.create_trial(value=v, intermediate_values={0: v, 1: v, 2: v},
                                                  params={}, distributions={}))
    trial = study.ask()
    key, _, quoted = sweeper._trial_env(trial, storage).partition("=")  # the override the job is launched with
    assert key == f"++hydra.job.env_set.{ENV}" and quoted[0] == quoted[-1] == "'"
    monkeypatch.setenv(ENV, quoted[1:-1])
    kind = {"percentile": optuna.pruners.PercentilePruner, "median": optuna.pruners.MedianPruner}[name]
    assert type(current_trial().study.pruner) is kind  # the job's own view of the study

    callback, trainer = _Constant.fit(value, tmp_path)
    reported = optuna.load_study(study_name="s", storage=storage).trials[trial.number].intermediate_values
    epochs = [0] if pruned else [0, 1, 2]  # a pruned job reported epoch 0, then stopped
    assert reported == pytest.approx({e: value for e in epochs}, abs=1e-6)  # (logged as float32)
    assert callback.pruned_at == (0 if pruned else None) and trainer.current_epoch == len(epochs)


def test_each_named_pruner_is_built_with_the_arguments_it_takes():
    import optuna

    from visionsweep.callbacks.optuna_pruning import make_pruner

    common = {"n_startup_trials": 2, "percentile": 10.0, "min_resource": 1, "max_resource": 3,
              "reduction_factor": 3, "n_warmup_steps": None}
    kinds = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
             "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
             "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}
    for name, kind in kinds.items():  # arguments a pruner does not take are left out, not an error
        assert type(make_pruner({"name": name, **common})) is kind, name
    assert type(make_pruner(None)) is optuna.pruners.NopPruner
    with pytest.raises(ValueError, match="pruner.name=asha: choose from median, successive_halving"):
        make_pruner({"name": "asha"})


def test_pruning_callback_is_built_only_for_a_job_of_an_optuna_sweep(tmp_path, monkeypatch):
    """Outside an Optuna sweep the callback has no trial to report to: the job neither builds nor imports it
    (a fresh interpreter shows the import). With the sweeper's variable set (what the sweeper hands a job) it is
    built from callbacks=default."""
    import subprocess
    import sys

    from conftest import compose_cfg
    from visionsweep.builders import build_callbacks
    from visionsweep.callbacks.optuna_pruning import ENV

    code = ("import sys; from hydra import compose, initialize_config_dir; from visionsweep.utils.cli import CONF_DIR\n"
            "from visionsweep.builders import build_callbacks\n"
            "with initialize_config_dir(str(CONF_DIR), version_base='1.3'):\n"
            f"    cfg = compose('train', overrides=['optimized_metric=val/acc', 'paths.output_dir={tmp_path}'])\n"
            "names = sorted(type(cb).__name__ for cb in build_callbacks(cfg))\n"
            "print(names, 'visionsweep.callbacks.optuna_pruning' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != ENV}
    outside = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert outside.returncode == 0, outside.stderr[-2000:]
    assert "OptunaPruning" not in outside.stdout and outside.stdout.strip().endswith("False"), outside.stdout
    monkeypatch.setenv(ENV, json.dumps({"storage": "sqlite://", "study": "s", "number": 0, "pruner": {"name": "median"}}))
    cfg = compose_cfg(tmp_path, ["optimized_metric=val/acc"])
    assert "OptunaPruning" in [type(cb).__name__ for cb in build_callbacks(cfg)]
