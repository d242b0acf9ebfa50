"""Hydra multiruns end to end: a grid with failing jobs, re-running a job from its saved config, Optuna."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_cli

# tiny jobs: resnet10t at 16 px, one epoch of two batches
TINY = ["model=resnet10t", "data.image_size=16", "logger=csv", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "data.verify_images=false"]


def _jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def _grid_args(digits_root: Path, sweep: Path) -> list[str]:
    return ["train", "-m", "experiment=smoke_sweep", *TINY, f"data.root={digits_root}", "augmentation=light",
            "seed=1,2", "data.val_fraction=0.1,1.5", f"hydra.sweep.dir={sweep}"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, digits_root) -> Path:
    """seed × val_fraction, where val_fraction=1.5 makes half the jobs fail."""
    sweep = tmp_path_factory.mktemp("sweep") / "multirun"
    proc = run_cli(*_grid_args(digits_root, sweep), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def _val_accs(run: Path) -> list[float]:
    """The per-epoch val/acc a job logged, read from its metrics.csv (not from run.json)."""
    return [float(r["val/acc"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/acc")]


def _tree(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.scaling  # end to end (a Hydra multirun): in make test-scaling, to keep make test short
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
    for job in jobs:
        r = runs[job.name]
        if r["status"] != "ok":
            continue
        # two training batches learn nothing to speak of (learning is tested in test_train): what is recorded
        # is the best of the val/acc the job logged
        logged = _val_accs(job)
        assert len(logged) == 1 and r["metrics"]["val/acc_best"] == pytest.approx(max(logged), abs=1e-6)
        assert r["git"]["commit"] and r["versions"]["torch"]
        assert len(r["data"]["fingerprint"]["sha256"]) == 64
        assert "augmentation=" in " ".join(r["overrides"]) and "seed=" in " ".join(r["overrides"])


@pytest.mark.scaling  # end to end (a Hydra multirun): in make test-scaling, to keep make test short
def test_finished_sweep_jobs_keep_their_best_checkpoint_and_drop_last(grid):
    """keep_last=auto: a job of a sweep that ended ok keeps its best (weights-only) checkpoint only; the full
    last.ckpt (optimizer state, for resuming) goes (the single run in the re-run test below keeps it)."""
    import torch

    for job in _jobs(grid):
        run = json.loads((job / "run.json").read_text())
        if run["status"] != "ok":
            continue
        ckpts = sorted(p.name for p in (job / "checkpoints").iterdir())
        assert ckpts == [Path(run["best_checkpoint"]).name] and "last.ckpt" not in ckpts, ckpts
        best = torch.load(job / "checkpoints" / ckpts[0], map_location="cpu", weights_only=True)
        assert "state_dict" in best and "optimizer_states" not in best


@pytest.mark.scaling  # end to end (a Hydra multirun): in make test-scaling, to keep make test short
def test_report_of_the_sweep_lists_failures(grid):
    from visionsweep.report import build_report

    build_report([grid])
    rows = (grid / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # 2 val fractions, seeds pooled
    md = (grid / "summary.md").read_text()
    assert md.count("data.val_fraction=1.5: give a number from 0 to 1") == 2 and md.count("| ConfigError |") == 2


@pytest.mark.scaling  # end to end (a Hydra multirun): in make test-scaling, to keep make test short
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
    # a single run (not a sweep job) keeps its full last.ckpt next to the best one (keep_last=auto)
    assert (again / "checkpoints" / "last.ckpt").is_file() and not (job / "checkpoints" / "last.ckpt").exists()


@pytest.mark.scaling  # end to end (a resumed multirun): in make test-scaling, to keep make test short
def test_a_rerun_sweep_refuses_a_job_run_with_another_config_and_reruns_failed_jobs(grid, tmp_path, digits_root):
    """The ledger on a copy of the grid: a job dir whose saved config differs is refused in one line (exit 2,
    nothing touched); restored, the same command skips the ok jobs and runs the failed ones again -- a job
    lost to a passing failure (marked failed here) then ends ok with the metrics it had."""
    import shutil

    sweep = tmp_path / "multirun"
    shutil.copytree(grid, sweep)
    runs = {j.name: json.loads((j / "run.json").read_text()) for j in _jobs(sweep)}
    ok = sorted((n for n, r in runs.items() if r["status"] == "ok"), key=int)
    failed = sorted((n for n, r in runs.items() if r["status"] == "failed"), key=int)
    lost, other = ok
    # 1. job <other> was run with another seed: its run.json hash and its saved config say so
    saved = sweep / other / ".hydra" / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    seed = config["seed"]
    saved.write_text(yaml.safe_dump({**config, "seed": 99}, sort_keys=False))
    run_json = sweep / other / "run.json"
    run_json.write_text(json.dumps({**runs[other], "config_hash": "0" * 16}))
    before = _tree(sweep)
    refused = run_cli(*_grid_args(digits_root, sweep), timeout=600)
    assert refused.returncode == 2, refused.stderr[-3000:]
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("error: ") and f"job {other} was run with another config (seed: 99 -> {seed})" in line
    assert _tree(sweep) == before  # nothing launched, nothing rewritten
    # 2. restored; job <lost> failed (say, a full disk): the same command runs it and the failed ones again
    shutil.copy2(grid / other / ".hydra" / "config.yaml", saved)
    shutil.copy2(grid / other / "run.json", run_json)
    (sweep / lost / "run.json").write_text(json.dumps({**runs[lost], "status": "failed", "error_type": "OSError",
                                                       "error": "OSError: [Errno 28] No space left on device"}))
    untouched = _tree(sweep / other)
    again = run_cli(*_grid_args(digits_root, sweep), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    actions = {k: v["action"] for k, v in json.loads((sweep / "ledger.json").read_text()).items()}
    assert actions == {lost: "run", other: "skip", **{n: "run" for n in failed}}, actions
    assert _tree(sweep / other) == untouched  # skipped: not launched at all
    rerun = json.loads((sweep / lost / "run.json").read_text())
    assert rerun["status"] == "ok"
    for key in ("val/loss", "val/acc", "val/acc_best", "test/acc", "train/loss"):
        assert rerun["metrics"][key] == runs[lost]["metrics"][key], key
    for n in failed:  # run again, and failing again for the same reason
        rerun = json.loads((sweep / n / "run.json").read_text())
        assert rerun["status"] == "failed" and rerun["error"] == runs[n]["error"]
        assert (sweep / n / "train.log").read_text().count(f"job failed: {rerun['error']}") == 2


@pytest.mark.scaling  # end to end (an Optuna sweep, resumed): in make test-scaling, to keep make test short
def test_optuna_study_is_stored_in_the_sweep_dir_and_resumes(tmp_path, digits_root):
    import optuna

    sweep = tmp_path / "optuna"
    args = ["-m", "experiment=optuna_lr", *TINY, f"data.root={digits_root}", f"hydra.sweep.dir={sweep}"]
    first = run_cli("train", *args, "hydra.sweeper.n_trials=1", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    study = optuna.load_study(study_name="optuna_lr", storage=f"sqlite:///{sweep / 'optuna.db'}")
    # the trial's value is the job's val/acc_best: the best val/acc its metrics.csv logged
    assert len(study.trials) == 1 and study.best_value == pytest.approx(max(_val_accs(sweep / "0")), abs=1e-6)
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
    best_logged = max(max(_val_accs(sweep / str(t.number))) for t in study.trials if t.state.name == "COMPLETE")
    assert study.best_value == pytest.approx(best_logged, abs=1e-6)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["n_complete"] == 2 and set(results["best_params"]) == set(params)
    from PIL import Image

    from visionsweep.report import build_report

    build_report([sweep])
    with Image.open(sweep / "optuna_history_optuna_lr.png") as im:
        im.verify()
    with Image.open(sweep / "optuna_history_optuna_lr.png") as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert pixels.shape[0] > 150 and pixels.shape[1] > 300, pixels.shape
    assert ((pixels.max(axis=2) - pixels.min(axis=2)) > 60).sum() > 50  # the trials drawn in colour, not blank
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


def test_plots_auto_draws_a_single_runs_plots_and_leaves_a_sweeps_jobs_to_the_report(tmp_path, monkeypatch):
    from conftest import compose_cfg
    from visionsweep.errors import ConfigError
    from visionsweep.run_config import check_config, plots_wanted

    bad, always = compose_cfg(tmp_path, ["plots=maybe"]), compose_cfg(tmp_path, ["plots=true"])
    auto = compose_cfg(tmp_path, [])  # (the default; compose_cfg makes it a single run's config)
    assert plots_wanted(auto) is True
    with pytest.raises(ConfigError, match=r"^plots=maybe: give auto"):
        check_config(bad)
    _as_sweep_job(tmp_path, monkeypatch)
    assert plots_wanted(auto) is False and plots_wanted(always) is True


def test_dashboard_runs_of_a_sweep_share_a_group_and_are_named_alike(tmp_path, monkeypatch):
    """wandb and MLflow are labelled one way (run_config.label_loggers): the same group / experiment per
    sweep and the same run name per job; wandb also carries arch/aug/seed tags."""
    pytest.importorskip("mlflow")
    from conftest import compose_cfg
    from visionsweep import builders, run_config

    cfg = compose_cfg(tmp_path, ["logger=[wandb,mlflow]", "model=resnet18", "augmentation=basic", "seed=7",
                                 f"paths.log_dir={tmp_path}"])
    _as_sweep_job(tmp_path, monkeypatch)
    run_config.label_loggers(cfg)
    loggers = {type(lg).__name__: lg for lg in builders.build_loggers(cfg, tmp_path)}
    init, mlflow = loggers["WandbLogger"]._wandb_init, loggers["SweepMLFlowLogger"]
    assert init["group"] == mlflow._experiment_name == "train-2026-01-01_00-00-00"
    assert init["name"] == mlflow._run_name == "resnet18-basic-seed7-job0"
    assert {"arch=resnet18", "aug=basic", "seed=7"} <= set(init["tags"])
    assert (mlflow.tags["arch"], mlflow.tags["aug"], mlflow.tags["seed"]) == ("resnet18", "basic", "7")


def test_saved_config_is_the_config_the_job_ran_with(tmp_path, shapes_root, monkeypatch, one_thread):
    """config.yaml holds what the job filled in (seed, input size, wandb labels): the trainer, its
    loggers and the model are built from exactly that config."""
    from omegaconf import OmegaConf

    from conftest import FAST, compose_cfg
    from visionsweep import builders
    from visionsweep.train import train

    cfg = compose_cfg(tmp_path, [*FAST, "model=resnet18", f"data.root={shapes_root}", "logger=wandb", "seed=3",
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
