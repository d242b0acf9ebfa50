"""Hydra multiruns end to end: a grid with failing jobs, re-running a job from its saved config, Optuna."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

# tiny jobs: resnet10t at 16 px, one epoch of two batches
TINY = ["model=resnet10t", "data.image_size=16", "logger=csv", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "data.verify_images=false"]


def _jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


@pytest.fixture(scope="module")
def grid(tmp_path_factory, digits_root) -> Path:
    """seed × val_fraction, where val_fraction=1.5 makes half the jobs fail."""
    sweep = tmp_path_factory.mktemp("sweep") / "multirun"
    proc = run_cli("train", "-m", "experiment=smoke_sweep", *TINY, f"data.root={digits_root}",
                   "augmentation=light", "seed=1,2", "data.val_fraction=0.1,1.5",
                   f"hydra.sweep.dir={sweep}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def test_failed_jobs_are_recorded_and_the_sweep_goes_on(grid):
    jobs = _jobs(grid)
    assert len(jobs) == 4
    runs = {j.name: json.loads((j / "run.json").read_text()) for j in jobs}
    failed = [r for r in runs.values() if r["status"] == "failed"]
    ok = [r for r in runs.values() if r["status"] == "ok"]
    assert len(failed) == 2 and len(ok) == 2
    assert all("data.val_fraction=1.5" in r["error"] and r["error_type"] == "ConfigError" for r in failed)
    for job in jobs:  # humans read the error in the job's log; the report reads run.json
        if runs[job.name]["status"] == "failed":
            assert f"job failed: {runs[job.name]['error']}" in (job / "train.log").read_text()
    for r in ok:
        # two training batches learn nothing to speak of (learning is tested in test_train): the metric exists
        assert 0.0 <= r["metrics"]["val/acc_best"] <= 1.0 and r["git"]["commit"] and r["versions"]["torch"]
        assert len(r["data"]["fingerprint"]["sha256"]) == 64
        assert "augmentation=" in " ".join(r["overrides"]) and "seed=" in " ".join(r["overrides"])


def test_report_of_the_sweep_lists_failures(grid):
    proc = run_cli("report", str(grid))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = (grid / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # 2 val fractions, seeds pooled
    md = (grid / "summary.md").read_text()
    assert md.count("data.val_fraction=1.5 is outside") == 2 and md.count("| ConfigError |") == 2


def test_a_job_rerun_from_its_saved_config_gives_identical_metrics_in_our_run_dir_layout(grid, tmp_path):
    job = next(j for j in _jobs(grid) if json.loads((j / "run.json").read_text())["status"] == "ok")
    before = json.loads((job / "run.json").read_text())["metrics"]
    # the README's command as is, started from another dir: runs/train/<stamp>/ there, not outputs/<date>/
    proc = run_cli("train", "--config-dir", str(job / ".hydra"), "--config-name", "config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()
    [again] = list((tmp_path / "runs" / "train").iterdir())
    after = json.loads((again / "run.json").read_text())["metrics"]
    for key in ("val/loss", "val/acc", "val/acc_best", "test/acc", "train/loss"):
        assert after[key] == before[key], key


def test_optuna_study_is_stored_in_the_sweep_dir_and_resumes(tmp_path, digits_root):
    import optuna

    sweep = tmp_path / "optuna"
    args = ["-m", "experiment=optuna_lr", *TINY, f"data.root={digits_root}", f"hydra.sweep.dir={sweep}"]
    first = run_cli("train", *args, "hydra.sweeper.n_trials=1", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    study = optuna.load_study(study_name="optuna_lr", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert len(study.trials) == 1 and study.best_value > 0
    params = study.trials[0].params
    assert 1e-4 <= params["optimizer.lr"] <= 3e-2 and params["augmentation"] in ("none", "light", "basic")
    # a sweep that died mid-trial leaves it RUNNING in the study (as job 1)
    study.ask()
    # resume: the same sweep dir with a larger total marks that trial interrupted and asks a new one (job 2)
    again = run_cli("train", *args, "hydra.sweeper.n_trials=2", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name="optuna_lr", storage=f"sqlite:///{sweep / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"] and study.trials[1].user_attrs == {"interrupted": True}
    assert (sweep / "2" / "run.json").is_file()
    assert study.trials[2].params != study.trials[0].params
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["n_complete"] == 2 and set(results["best_params"]) == set(params)
    report = run_cli("report", str(sweep))
    assert report.returncode == 0, report.stderr[-2000:]
    assert (sweep / "optuna_history_optuna_lr.png").is_file()
    assert "best trial" in (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path, digits_root):
    """The shipped smoke sweep as `make sweep` runs it (18 jobs), then its report."""
    sweep = tmp_path / "smoke"
    proc = run_cli("train", "-m", "experiment=smoke_sweep", f"data.root={digits_root}",
                   f"hydra.sweep.dir={sweep}", "trainer.enable_progress_bar=false", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_jobs(sweep)) == 18
    report = run_cli("report", str(sweep))
    assert report.returncode == 0, report.stderr[-2000:]
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 6


def _as_sweep_job(cfg_dir: Path, monkeypatch) -> None:
    """Make the current HydraConfig say: job 0 of a multirun under ``<cfg_dir>/multirun/<stamp>``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # restored after the test
    hydra_cfg = OmegaConf.structured(HydraConfig.get())  # a writable copy, as a sweep job would have
    OmegaConf.set_readonly(hydra_cfg, False)
    with open_dict(hydra_cfg):
        hydra_cfg.mode = RunMode.MULTIRUN
        hydra_cfg.sweep.dir = str(cfg_dir / "multirun" / "2026-01-01_00-00-00")
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_cfg}))


def test_wandb_runs_of_a_sweep_share_a_group_and_carry_tags(tmp_path, monkeypatch):
    from conftest import compose_cfg
    from visionsweep import builders, run_config

    cfg = compose_cfg(tmp_path, ["logger=wandb", "model=resnet18", "augmentation=basic", "seed=7"])
    _as_sweep_job(tmp_path, monkeypatch)
    run_config.label_wandb_run(cfg)
    [wandb_logger] = [lg for lg in builders.build_loggers(cfg, tmp_path) if type(lg).__name__ == "WandbLogger"]
    init = wandb_logger._wandb_init
    assert init["group"] == "train-2026-01-01_00-00-00"
    assert {"arch=resnet18", "aug=basic", "seed=7"} <= set(init["tags"])
    assert init["name"].startswith("resnet18-basic-seed7")


def test_saved_config_is_the_config_the_job_ran_with(tmp_path, shapes_root, monkeypatch, one_thread):
    """config.yaml holds what the job filled in (seed, input size, wandb labels): the trainer, its
    loggers and the model are built from exactly that config."""
    from omegaconf import OmegaConf

    from conftest import FAST, compose_cfg
    from visionsweep import builders
    from visionsweep.train import train

    cfg = compose_cfg(tmp_path, [*FAST, f"data.root={shapes_root}", "logger=wandb", "seed=3",
                                 "data.crop_pct=null", "data.interpolation=null", "trainer.max_epochs=1",
                                 "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"])
    _as_sweep_job(tmp_path, monkeypatch)
    used = []
    real = builders.build_trainer

    def build_trainer(cfg, *args, **kwargs):
        trainer = real(cfg, *args, **kwargs)
        used.append(OmegaConf.to_container(cfg, resolve=True))  # after the loggers were built from it
        return trainer

    monkeypatch.setattr(builders, "build_trainer", build_trainer)
    train(cfg)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert used == [saved]
    wandb = saved["logger"]["wandb"]
    assert {"arch=resnet18", "aug=none", "seed=3"} <= set(wandb["tags"])
    assert (wandb["group"], wandb["name"]) == ("train-2026-01-01_00-00-00", "resnet18-none-seed3-job0")
    assert (saved["data"]["crop_pct"], saved["data"]["interpolation"]) == (0.95, "bicubic")  # resnet18's, timm
