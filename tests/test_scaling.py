"""Scaling out: thread budgets, the sweep ledger, launchers (joblib, submitit, Ray), resuming a killed sweep.

The unit tests run in ``make test``; the end-to-end sweeps are marked ``scaling`` (``pytest -m scaling``,
a second step of .ci/run).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from test_sweeps import TINY, _jobs

METRICS = ("train/loss", "val/loss", "val/acc", "val/acc_best", "test/acc")


# ---------------------------------------------------------------------------- thread budget

def _unset(monkeypatch, *names: str) -> None:
    """Remove ``names`` from the environment for this test, restored afterwards even if the code under test
    sets them (monkeypatch.delenv of an absent variable records nothing)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY",
              "VISIONSWEEP_OUTSIDE_THREADS", "VISIONSWEEP_JOBS_PER_NODE")

def test_auto_threads_share_the_node_among_the_jobs_running_at_once(monkeypatch):
    from visionsweep.parallel import JOBS_PER_NODE_VAR, launch_env, resolve_threads

    _unset(monkeypatch, *THREAD_ENV)
    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}
    assert resolve_threads("auto", joblib, cores=2) == 1
    assert resolve_threads("auto", {**joblib, "n_jobs": -1}, cores=8) == 1  # -1: one job per core
    assert resolve_threads("auto", None, cores=8) == 8  # basic launcher: one job at a time
    slurm = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
             "tasks_per_node": 4, "cpus_per_task": None}
    assert resolve_threads("auto", slurm, cores=16) == 4
    assert resolve_threads("auto", {**slurm, "cpus_per_task": 6}, cores=16) == 6
    ray = {"_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
           "ray": {"init": {}, "remote": {"num_cpus": 4}}}
    assert resolve_threads("auto", ray, cores=16) == 4
    assert resolve_threads(3, joblib, cores=2) == 3 and resolve_threads("2", None, cores=2) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a budget set outside (the shell, SLURM) bounds every job
    assert resolve_threads("auto", None, cores=8) == 3 and resolve_threads("auto", joblib, cores=8) == 3
    assert resolve_threads("auto", {**joblib, "n_jobs": 4}, cores=8) == 2 and resolve_threads(5, None, cores=8) == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv(JOBS_PER_NODE_VAR, "4")  # what a sweeper says about the batch it launches
    assert resolve_threads("auto", None, cores=8) == 2
    assert launch_env(1, 2)["OMP_WAIT_POLICY"] == "PASSIVE" and "OMP_WAIT_POLICY" not in launch_env(4, 1)
    assert launch_env(3, 1)["OMP_NUM_THREADS"] == "3"


def test_the_outside_thread_budget_outlives_the_value_a_sweep_writes(monkeypatch):
    """A sweep writes OMP_NUM_THREADS for the jobs it starts (and the basic launcher's jobs share its process):
    what the user's shell had set still bounds the next job, our own value is never taken for it, and a value
    someone sets after ours (a test runner, for its child) is theirs."""
    from visionsweep.parallel import launch_env, outside_threads, resolve_threads, set_thread_env

    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}
    _unset(monkeypatch, *THREAD_ENV)
    set_thread_env(launch_env(1, 2))  # nothing set outside: a job of 1 thread does not cap the next one
    assert os.environ["OMP_NUM_THREADS"] == "1" and outside_threads() is None
    assert resolve_threads("auto", None, cores=8) == 8 and resolve_threads("auto", joblib, cores=8) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # set after ours: a budget
    assert outside_threads() == 3
    set_thread_env(launch_env(4, 1))  # a job above the budget (threads=4): it does not raise the budget
    set_thread_env(launch_env(2, 1))
    assert os.environ["OMP_NUM_THREADS"] == "2" and outside_threads() == 3
    assert resolve_threads("auto", None, cores=8) == 3 and resolve_threads("auto", joblib, cores=8) == 3


@pytest.mark.parametrize("bad", ["0", "-1", "many", 1.5])
def test_a_bad_thread_count_names_itself(bad):
    from visionsweep.errors import ConfigError
    from visionsweep.parallel import resolve_threads

    with pytest.raises(ConfigError, match="threads="):
        resolve_threads(bad, None, cores=2)


def test_apply_threads_sets_torch_and_the_children_environment(monkeypatch):
    import torch

    from visionsweep.parallel import apply_threads

    _unset(monkeypatch, *THREAD_ENV)
    before = torch.get_num_threads()
    try:
        assert apply_threads(1, concurrent=2) == 1
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- ledger
def test_config_hash_ignores_where_and_how_a_job_runs():
    from omegaconf import OmegaConf

    from visionsweep.ledger import config_hash, first_difference

    base = {"seed": 1, "model": {"backbone": "resnet10t"}, "paths": {"output_dir": "/a"}, "ckpt_path": None}
    cfg = OmegaConf.create({**base, "hydra": {"job": {"num": 0}}, "threads": "auto"})
    moved = OmegaConf.create({**base, "paths": {"output_dir": "/b"}, "ckpt_path": "/b/last.ckpt", "threads": 1})
    assert config_hash(cfg) == config_hash(moved) == config_hash(base)
    other = OmegaConf.create({**base, "model": {"backbone": "resnet18"}})
    assert config_hash(other) != config_hash(cfg)
    assert first_difference(cfg, other) == "model.backbone: 'resnet10t' -> 'resnet18'"
    assert first_difference(cfg, moved) is None
    # interpolations are hashed as written: the sweeper (before the job runs) and the job agree
    assert config_hash({"a": "${paths.output_dir}/x"}) == config_hash(OmegaConf.create({"a": "${paths.output_dir}/x"}))


def test_the_ledger_reads_each_job_dir_of_a_sweep(tmp_path):
    from visionsweep import ledger

    # the status says what happened: a failure whose text names an interrupt is not guessed to be one
    runs = {"0": {"status": "ok", "config_hash": "abc"}, "1": {"status": "running"},
            "2": {"status": "interrupted", "error": "SIGTERMException: stopped by a SIGTERM (preempted or cancelled)"},
            "3": {"status": "failed", "error": "KeyboardInterrupt: raised by the user's own code", "error_type": "X"},
            # a SIGTERM recorded before the interrupted status existed: still resumed
            "5": {"status": "failed", "error": "SIGTERMException: ", "error_type": "SIGTERMException"}}
    for num, run in runs.items():
        (tmp_path / num / "checkpoints").mkdir(parents=True)
        (tmp_path / num / "run.json").write_text(json.dumps(run))
    (tmp_path / "1" / "checkpoints" / "last.ckpt").write_bytes(b"")
    (tmp_path / "4").mkdir()  # started, no run.json yet
    (tmp_path / ".submitit").mkdir()
    entries = ledger.read(tmp_path)
    assert sorted(entries) == [0, 1, 2, 3, 4, 5]
    assert entries[0].status == "ok" and entries[0].config_hash == "abc" and entries[4].status == "missing"
    assert entries[1].last_ckpt == tmp_path / "1" / "checkpoints" / "last.ckpt" and entries[0].last_ckpt is None
    assert [entries[n].interrupted for n in range(6)] == [False, True, True, False, False, True]
    view = json.loads(ledger.write(tmp_path, {0: "skip", 1: "resume"}).read_text())
    assert view["0"] == {"status": "ok", "config_hash": "abc", "action": "skip"} and view["3"]["action"] is None


# ---------------------------------------------------------------------------- launchers, end to end
def _sweep_args(digits_root: Path, sweep: Path, *extra: str, seeds: str = "1,2,3,4") -> list[str]:
    return ["-m", "experiment=smoke_sweep", *TINY, f"data.root={digits_root}", "augmentation=light",
            f"seed={seeds}", "++threads=1", *extra, f"hydra.sweep.dir={sweep}"]


def _metrics(sweep: Path) -> list[dict]:
    out = []
    for job in _jobs(sweep):
        run = json.loads((job / "run.json").read_text())
        assert run["status"] == "ok", (job, run.get("error"))
        out.append({k: run["metrics"][k] for k in METRICS})
    return out


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, digits_root) -> Path:
    sweep = tmp_path_factory.mktemp("seq") / "multirun"
    proc = run_cli("train", *_sweep_args(digits_root, sweep), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


@pytest.mark.scaling
def test_joblib_sweep_equals_the_sequential_sweep_metric_for_metric(sequential, tmp_path, digits_root):
    sweep = tmp_path / "joblib"
    proc = run_cli("train", *_sweep_args(digits_root, sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
                   timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_jobs(sweep)) == 4
    assert _metrics(sweep) == _metrics(sequential)
    logs = " ".join((j / "train.log").read_text() for j in _jobs(sweep))
    assert logs.count("threads: 1 (threads=1)") == 4  # set in each worker before its job


def _check_report(sweep: Path, jobs: int) -> None:
    assert len(_jobs(sweep)) == jobs
    for job in _jobs(sweep):
        assert (job / ".hydra" / "config.yaml").is_file() and (job / "metrics.csv").is_file()
    report = run_cli("report", str(sweep))
    assert report.returncode == 0, report.stderr[-2000:]
    assert (sweep / "summary.csv").is_file() and (sweep / "report.html").is_file()


@pytest.mark.scaling
def test_submitit_local_sweep_completes_with_run_dirs_and_a_report(sequential, tmp_path, digits_root):
    sweep = tmp_path / "submitit"
    proc = run_cli("train", *_sweep_args(digits_root, sweep, "hydra/launcher=submitit_local", seeds="1,2"),
                   timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _metrics(sweep) == _metrics(sequential)[:2]
    _check_report(sweep, 2)


@pytest.mark.scaling
def test_ray_sweep_on_a_local_ray_instance_completes_with_run_dirs_and_a_report(sequential, tmp_path, digits_root):
    if os.environ.get("CI") != "true":  # CI installs the `ray` extra and must run this test
        pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    sweep = tmp_path / "ray"
    ray = ["hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
           "+hydra.launcher.ray.init.include_dashboard=false"]
    proc = run_cli("train", *_sweep_args(digits_root, sweep, *ray, seeds="1,2"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _metrics(sweep) == _metrics(sequential)[:2]
    _check_report(sweep, 2)


# ---------------------------------------------------------------------------- resume
def _hashes(dirs: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() + f":{p.stat().st_mtime_ns}"
            for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.scaling
def test_a_killed_sweep_rerun_skips_finished_jobs_and_resumes_the_interrupted_one(tmp_path, digits_root):
    sweep = tmp_path / "killed"
    # 3 epochs per job so that job 1 can be killed after its first checkpoint, mid-job
    args = ["train", *_sweep_args(digits_root, sweep, "trainer.max_epochs=3", "trainer.limit_train_batches=8",
                                  "callbacks.model_checkpoint.last_every_s=0", seeds="1,2,3")]
    proc = subprocess.Popen([sys.executable, "-m", f"visionsweep.{args[0]}", *args[1:]], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    last = sweep / "1" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.is_file(), "job 1 never wrote a checkpoint"
    assert json.loads((sweep / "1" / "run.json").read_text())["status"] == "running"
    before = _hashes([sweep / "0"])
    again = run_cli(*args, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _hashes([sweep / "0"]) == before  # not launched at all: every file, byte for byte and mtime
    runs = [json.loads((j / "run.json").read_text()) for j in _jobs(sweep)]
    assert [r["status"] for r in runs] == ["ok"] * 3 and runs[2]["epochs"] == 3
    assert runs[1]["resumed_from"] == str(last.resolve()) and runs[1]["epochs"] == 3
    assert not list(sweep.rglob("last-v*.ckpt"))
    # the resumed job ends exactly as the same job run without a kill (seed 2 alone, in another dir)
    alone = tmp_path / "alone"
    clean = run_cli("train", *_sweep_args(digits_root, alone, "trainer.max_epochs=3", "trainer.limit_train_batches=8",
                                          seeds="2"), timeout=900)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert _metrics(alone)[0] == {k: runs[1]["metrics"][k] for k in METRICS}
    actions = {k: v["action"] for k, v in json.loads((sweep / "ledger.json").read_text()).items()}
    assert actions == {"0": "skip", "1": "resume", "2": "run"}
    # a third time: nothing left to do, nothing touched
    done = _hashes(_jobs(sweep))
    third = run_cli(*args, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert _hashes(_jobs(sweep)) == done
    # another sweep in the same dir: one line naming the difference, exit 2, nothing touched
    other = run_cli("train", *_sweep_args(digits_root, sweep, "trainer.max_epochs=3",
                                          "trainer.limit_train_batches=8", seeds="1,2,5"), timeout=300)
    assert other.returncode == 2
    [line] = other.stderr.strip().splitlines()
    assert line.startswith("error: ") and "seed: 1,2,3 -> 1,2,5" in line
    assert _hashes(_jobs(sweep)) == done


# ---------------------------------------------------------------------------- Optuna without a batch barrier
def _idle_spans(jobs: list[tuple[float, float]], slots: int) -> list[float]:
    """Lengths of the spans in which fewer than ``slots`` jobs ran, from the moment every slot first held a
    job (before it, the launcher's workers are still starting) to the last job's start."""
    first_full = sorted(s for s, _ in jobs)[slots - 1]
    events = sorted({t for job in jobs for t in job if t >= first_full})
    last_start = max(s for s, _ in jobs)
    spans, open_at = [], None
    for a in events:
        if a >= last_start:
            break
        busy = sum(s <= a < e for s, e in jobs)
        if busy < slots and open_at is None:
            open_at = a
        elif busy >= slots and open_at is not None:
            spans.append(a - open_at)
            open_at = None
    if open_at is not None:
        spans.append(last_start - open_at)
    return spans


def _random_seed_with_mixed_lengths(choices: list[int], n: int) -> tuple[int, list[int]]:
    """A RandomSampler seed whose first ``n`` asks start long then short (so a batch would wait)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"trainer.max_epochs": optuna.distributions.CategoricalDistribution(choices)}
    for seed in range(100):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        asked = [study.ask(space).params["trainer.max_epochs"] for _ in range(n)]
        if asked[:2] == [choices[1], choices[0]] and asked.count(choices[0]) >= 2 and choices[1] in asked[2:]:
            return seed, asked
    raise AssertionError("no seed found")


@pytest.mark.scaling  # 5 trials through joblib (~1.5 min on 2 cores)
def test_parallel_optuna_keeps_every_slot_busy_while_trials_are_left(tmp_path, digits_root):
    import optuna

    seed, lengths = _random_seed_with_mixed_lengths([1, 40], 5)
    sweep = tmp_path / "study"
    proc = run_cli("train", "-m", *TINY, f"data.root={digits_root}", "trainer.limit_train_batches=6",
                   "trainer.limit_val_batches=1", "test=false", "hydra/sweeper=visionsweep_optuna",
                   "hydra.sweeper.n_trials=5", "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.name=random",
                   f"hydra.sweeper.sampler.seed={seed}", "trainer.max_epochs=choice(1,40)",
                   "optimized_metric=val/acc_best", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   "++threads=1", f"hydra.sweep.dir={sweep}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads((sweep / str(i) / "run.json").read_text()) for i in range(5)]
    assert [r["status"] for r in runs] == ["ok"] * 5 and [r["epochs"] for r in runs] == lengths
    jobs = [(r["started"], r["finished"]) for r in runs]
    long_s = max(e - s for s, e in jobs) - min(e - s for s, e in jobs)
    spans = _idle_spans(jobs, 2)
    # a batched sweep leaves a slot idle for about long_s (the short trial's slot waits for the long one);
    # here a slot is only idle between a trial's end and the next trial's start (tell, ask, the job's set-up:
    # a few seconds, more on a loaded machine)
    assert long_s > 12 and max(spans, default=0) < max(5.0, long_s / 3), (spans, long_s, jobs)
    study = optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    print("trials (epochs, start, end, relative s):",
          [(n, round(s - jobs[0][0], 1), round(e - jobs[0][0], 1)) for n, (s, e) in zip(lengths, jobs)])
