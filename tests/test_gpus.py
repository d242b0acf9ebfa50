"""GPU leases (visionsweep.gpus): one GPU per job (or a share of one), from a pool the node shares.

On a CPU the pool is pretend ids (``gpus.pool=[0,1,2]``): a job holds a lease on an id and runs on the
CPU, which is all the lease logic needs. The leases are taken by separate processes, as jobs are.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import FAST, REPO, run_cli
from visionsweep import gpus
from visionsweep.errors import ConfigError

HOLDER = """
import os, sys, time
from visionsweep import gpus
lease = gpus.acquire(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4], label="holder")
print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
time.sleep(600)
"""


def _holder(lock_dir: Path, pool: str, per_job: int = 1, jobs_per_gpu: int = 1) -> tuple[subprocess.Popen, str]:
    """A process that leases from ``pool`` and keeps it until killed; returns it and what it sees."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(per_job), str(jobs_per_gpu), pool, str(lock_dir)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    line = proc.stdout.readline().strip()
    assert line, "the holder took no lease"
    return proc, line


@pytest.fixture
def clean_lease(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    yield
    gpus.release()


def test_a_job_gets_a_free_gpu_and_sees_only_it(tmp_path, clean_lease):
    holder, seen = _holder(tmp_path, "0,1")
    try:
        lease = gpus.acquire(1, 1, [0, 1], tmp_path)
        assert {seen, ",".join(lease.ids)} == {"0", "1"}  # two jobs, two GPUs
        assert os.environ["CUDA_VISIBLE_DEVICES"] == lease.ids[0] and gpus.current() is lease
        assert gpus.record(lease, on_cuda=False) == {"ids": [int(lease.ids[0])], "name": None, "memory_gb": None}
        assert json.loads((tmp_path / f"gpu-{seen}.slot0.lock").read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_full_pool_waits_and_a_killed_holder_gives_its_gpu_back(tmp_path, clean_lease):
    holder, seen = _holder(tmp_path, "3")
    try:
        with pytest.raises(TimeoutError):  # it waits, never oversubscribes
            gpus.acquire(pool=[3], lock_dir=tmp_path, timeout=1.0)
        holder.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel drops its lock
        holder.wait()
        lease = gpus.acquire(pool=[3], lock_dir=tmp_path, timeout=5)
        assert lease.ids == ["3"]
    finally:
        holder.kill()
        holder.wait()


def test_jobs_per_gpu_packs_that_many_jobs_on_one_gpu(tmp_path, clean_lease):
    first, seen1 = _holder(tmp_path, "0", jobs_per_gpu=2)
    second, seen2 = _holder(tmp_path, "0", jobs_per_gpu=2)
    try:
        assert seen1 == seen2 == "0"
        with pytest.raises(TimeoutError):  # a third waits
            gpus.acquire(pool=[0], jobs_per_gpu=2, lock_dir=tmp_path, timeout=1.0)
    finally:
        for p in (first, second):
            p.kill()
            p.wait()


def test_packed_jobs_spread_over_the_gpus_before_they_share(tmp_path, clean_lease):
    holder, seen = _holder(tmp_path, "0,1", jobs_per_gpu=2)
    try:
        lease = gpus.acquire(1, 2, [0, 1], tmp_path)
        assert lease.ids != [seen]  # the idle GPU first, though a slot is free beside the holder
    finally:
        holder.kill()
        holder.wait()


def test_a_ddp_job_leases_trainer_devices_gpus(tmp_path, clean_lease):
    cfg = OmegaConf.create({"gpus": {"per_job": 1, "jobs_per_gpu": 1, "pool": [0, 1, 2], "lock_dir": str(tmp_path)},
                            "trainer": {"accelerator": "gpu", "devices": 2}})
    lease = gpus.acquire_for(cfg, None)
    assert len(lease.ids) == 2 and os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(lease.ids)
    gpus.release()
    every = OmegaConf.merge(cfg, {"trainer": {"devices": -1}})  # "all GPUs": the whole pool, not just one
    assert gpus.acquire_for(every, None).ids == ["0", "1", "2"]


def test_who_takes_a_lease(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    base = {"gpus": {"pool": None}, "trainer": {"accelerator": "auto", "devices": 1}}
    cfg = OmegaConf.create(base)
    assert gpus.wanted(cfg, None)
    assert not gpus.wanted(OmegaConf.merge(cfg, {"trainer": {"accelerator": "cpu"}}), None)
    assert gpus.wanted(OmegaConf.merge(cfg, {"trainer": {"accelerator": "cpu"}, "gpus": {"pool": [0]}}), None)
    assert not gpus.wanted(OmegaConf.merge(cfg, {"trainer": {"devices": [2]}}), None)  # the user chose a GPU
    ray = {"_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"}
    slurm = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}
    assert not gpus.wanted(cfg, ray) and not gpus.wanted(cfg, slurm) and gpus.wanted(cfg, joblib)
    monkeypatch.setenv("LOCAL_RANK", "1")  # an extra DDP rank: rank 0's lease covers it
    assert not gpus.wanted(cfg, joblib)


@pytest.mark.parametrize("kw, key", [({"per_job": 0}, "gpus.per_job=0"), ({"jobs_per_gpu": "two"}, "gpus.jobs_per_gpu=two"),
                                     ({"pool": "0"}, "gpus.pool=0"), ({"pool": [1, 1]}, "gpus.pool="),
                                     ({"pool": [0], "per_job": 2}, "gpus.per_job=2")])
def test_a_bad_gpus_value_is_one_line_naming_the_key(tmp_path, clean_lease, kw, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")) as e:
        gpus.acquire(lock_dir=tmp_path, **kw)
    assert "\n" not in str(e.value)


def test_a_lock_dir_that_is_a_file_is_one_line_and_the_file_is_untouched(tmp_path, clean_lease):
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes")
    with pytest.raises(ConfigError, match="gpus.lock_dir=.*notes.txt is not a"):
        gpus.acquire(pool=[0], lock_dir=mine)
    with pytest.raises(ConfigError, match="gpus.lock_dir="):
        gpus.acquire(pool=[0], lock_dir=mine / "sub")
    assert mine.read_text() == "my notes"


@pytest.mark.scaling  # end to end (a CLI run and a sweep): in make test-scaling, to keep make test short
def test_a_bad_gpus_value_on_the_command_line_is_one_line(tmp_path, shapes_root):
    proc = run_cli("train", *FAST, f"data.root={shapes_root}", "gpus.pool=[0]", "gpus.per_job=2",
                   f"gpus.lock_dir={tmp_path / 'locks'}", f"paths.log_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "gpus.per_job=2" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "runs").rglob("*.yaml"))  # no half-made run dir left behind
    # in a sweep the job fails on it and records why (it never runs on GPUs it did not lease)
    sweep = tmp_path / "sweep"
    proc = run_cli("train", "-m", *FAST, f"data.root={shapes_root}", "gpus.pool=[0]", "gpus.per_job=2",
                   f"gpus.lock_dir={tmp_path / 'locks'}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    record = json.loads((sweep / "0" / "run.json").read_text())
    assert record["status"] == "failed" and "gpus.per_job=2" in record["error"], (record, proc.stderr[-2000:])


def _intervals(sweep: Path, n: int) -> list[dict]:
    runs = [json.loads((sweep / str(i) / "run.json").read_text()) for i in range(n)]
    assert all(r["status"] == "ok" for r in runs), [r.get("error") for r in runs]
    return [{"ids": r["gpu"]["ids"], "start": r["started"], "end": r["finished"]} for r in runs]


@pytest.mark.scaling  # 7 small jobs through joblib (~1 min on 2 cores)
def test_a_joblib_sweep_never_holds_one_gpu_twice(tmp_path, shapes_root):
    sweep = tmp_path / "sweep"
    proc = run_cli("train", "-m", *FAST, f"data.root={shapes_root}", "trainer.max_epochs=1",
                   "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false",
                   "seed=1,2,3,4,5,6,7", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3", "gpus.pool=[0,1,2]",
                   f"gpus.lock_dir={tmp_path / 'locks'}", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _intervals(sweep, 7)
    assert all(len(j["ids"]) == 1 and j["ids"][0] in (0, 1, 2) for j in jobs)
    for a in jobs:
        for b in jobs:
            if a is not b and a["ids"] == b["ids"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)  # one holder at a time
    # the pool was used: at some moment more than one GPU was busy
    events = sorted((j["start"], j["end"]) for j in jobs)
    most = max(sum(s <= t < e for s, e in events) for t, _ in events)
    assert most >= 2, events
    print("lease timeline (id, start, end, relative s):",
          [(j["ids"][0], round(j["start"] - events[0][0], 1), round(j["end"] - events[0][0], 1)) for j in jobs])


def test_a_process_whose_cuda_started_leases_only_what_it_still_sees(tmp_path, clean_lease, monkeypatch):
    """A joblib worker's second job: CUDA initialised under the first lease cannot see other GPUs."""
    holder, seen = _holder(tmp_path, "1")
    try:
        monkeypatch.setattr(gpus, "_bound", ["1"])
        monkeypatch.setattr(gpus, "_cuda_initialised", lambda: True)
        with pytest.raises(TimeoutError):  # GPU 0 is free, but this process cannot see it
            gpus.acquire(pool=[0, 1], lock_dir=tmp_path, timeout=1.0)
        with pytest.raises(ConfigError, match="can still see 1 GPU"):
            gpus.acquire(2, 1, [0, 1], tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert gpus.acquire(pool=[0, 1], lock_dir=tmp_path, timeout=5).ids == ["1"]


def test_a_job_after_a_lease_sees_the_gpus_the_process_started_with(tmp_path, clean_lease, monkeypatch):
    monkeypatch.setattr(gpus, "_captured", True)
    monkeypatch.setattr(gpus, "_original_visible", "0,1")
    monkeypatch.setattr(gpus, "_node", None)
    gpus.acquire(pool=[1], lock_dir=tmp_path)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    gpus.release()  # the next job of this process (a reused worker) leases from both again
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1" and gpus.node_gpus() == ["0", "1"]
    with pytest.raises(ConfigError, match=r"gpus.pool=\[0, 2\] names GPUs outside CUDA_VISIBLE_DEVICES=0,1"):
        gpus.acquire(pool=[0, 2], lock_dir=tmp_path)


def test_a_reused_worker_trains_on_the_index_of_its_lease(monkeypatch):
    """CUDA started here under an earlier two-GPU lease (a DDP job): a one-GPU lease of "1" is cuda:1 here."""
    monkeypatch.setattr(gpus, "_bound", ["0", "1"])
    assert gpus.trainer_devices(gpus.Lease(ids=["1"])) == [1]
    assert gpus.trainer_devices(gpus.Lease(ids=["0"])) is None  # cuda:0 = trainer.devices=1 as configured
    monkeypatch.setattr(gpus, "_bound", ["1"])  # the usual case: the lease set the view
    assert gpus.trainer_devices(gpus.Lease(ids=["1"])) is None


def test_ranks_other_launchers_started_and_other_commands_take_no_lease(monkeypatch):
    cfg = OmegaConf.create({"gpus": {"pool": None}, "trainer": {"accelerator": "gpu", "devices": 1}})
    for var in ("LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    assert gpus.wanted(cfg, None)
    assert not gpus.wanted(OmegaConf.create({"trainer": {"devices": 1}}), None)  # eval / predict / see
    for var, value in (("WORLD_SIZE", "4"), ("TORCHELASTIC_RUN_ID", "x"), ("SLURM_STEP_NUM_TASKS", "4")):
        monkeypatch.setenv(var, value)
        assert not gpus.wanted(cfg, None), var
        monkeypatch.delenv(var)


def test_rank_zero_environment_is_restored_after_a_ddp_job(monkeypatch):
    from visionsweep import distributed

    monkeypatch.setenv("MASTER_ADDR", "head")  # set by the user: kept
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed._remember_env()
    os.environ.update(WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")  # what the launcher sets
    distributed.restore_env()
    assert "WORLD_SIZE" not in os.environ and "LOCAL_RANK" not in os.environ and os.environ["MASTER_ADDR"] == "head"
