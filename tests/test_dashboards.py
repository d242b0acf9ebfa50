"""Dashboards checked against the real servers: MLflow, TensorBoard (HParams tab), optuna-dashboard.

One tiny Optuna sweep (2 trials, ``logger=[mlflow,tensorboard]``) feeds all three; each server binds
127.0.0.1 on a free port, is waited for with a timeout and always killed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import CONF, compose_cfg, run_cli
from test_sweeps import TINY

HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None  # both come with the dashboards extra
HAVE_OPTUNA_DASHBOARD = importlib.util.find_spec("optuna_dashboard") is not None
NO_EXTRA = "the dashboards extra is not installed: pip install -e '.[dashboards]'"

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
BIN = Path(sys.executable).parent


@pytest.fixture
def multirun_job(tmp_path) -> Iterator[Path]:
    """Hydra's state inside job 3 of a sweep over data.val_fraction (CLI) and model (sweeper params)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    sweep_dir = tmp_path / "2026-12-01_10-00-00_000000"
    sweep_dir.mkdir()
    cli = ["data.val_fraction=0.1,0.2", "trainer.enable_progress_bar=false", "scheduler=cosine"]
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": cli}}}), sweep_dir / "multirun.yaml")
    job = ["data.val_fraction=0.2", "trainer.enable_progress_bar=false", "model=resnet18", "seed=7",
           "scheduler=cosine", "augmentation=basic"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=job, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.sweep.dir, cfg.hydra.job.num = RunMode.MULTIRUN, str(sweep_dir), 3
        # a grid over model, seed and scheduler, where the command line fixes the scheduler
        cfg.hydra.sweeper.params = {"model": "resnet18,resnet10t", "seed": "7,8", "scheduler": "cosine,onecycle"}
        cfg.hydra.runtime.output_dir = str(sweep_dir / "3")
    HydraConfig.instance().set_config(cfg)
    yield sweep_dir
    HydraConfig.instance().cfg = None  # later tests must not think they run inside a sweep


def test_a_sweep_job_is_labelled_by_what_varies(multirun_job):
    from visionsweep.callbacks.hparams import job_params, sweep_names, varying_keys

    assert varying_keys() == ["model", "seed", "data.val_fraction"]
    # model=resnet18 says what arch=resnet18 says: one column; the constant overrides are no column
    assert job_params("resnet18", "basic", 7) == {
        "arch": "resnet18", "aug": "basic", "seed": 7, "data.val_fraction": 0.2}
    every = job_params("resnet18", "basic", 7, all_overrides=True)  # MLflow: every override, as typed
    assert every["trainer.enable_progress_bar"] == "false" and every["data.val_fraction"] == "0.2"
    assert every["model"] == "resnet18" and every["scheduler"] == "cosine" and every["seed"] == 7
    assert sweep_names("train", "resnet18", "basic", 7) == (
        f"train-{multirun_job.name}", "resnet18-basic-seed7-job3")


def test_a_single_run_is_labelled_by_all_its_overrides(tmp_path):
    import pytorch_lightning as pl
    import yaml

    from visionsweep.callbacks.hparams import JobHParams
    from visionsweep.callbacks.hparams import job_params, sweep_names

    compose_cfg(tmp_path, ["model=resnet10t", "seed=3", "optimizer.lr=0.01"])
    assert job_params("resnet10t", "light", 3) == {"arch": "resnet10t", "aug": "light", "seed": 3,
                                                    "optimizer.lr": 0.01}
    assert sweep_names("train", "resnet10t", "light", 3) == ("train", "resnet10t-light-seed3")
    # the callback hands them to the loggers that do not label themselves (csv → hparams.yaml)
    csv = pl.loggers.CSVLogger(str(tmp_path), name="", version="")
    trainer = pl.Trainer(logger=csv, max_epochs=1, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False)
    JobHParams("resnet10t", "light", 3).on_fit_start(trainer, None)
    csv.save()
    saved = yaml.safe_load((tmp_path / "hparams.yaml").read_text())
    assert saved["arch"] == "resnet10t" and saved["aug"] == "light" and saved["seed"] == 3
    assert saved["optimizer.lr"] == 0.01


def test_logger_mlflow_without_mlflow_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    from visionsweep import builders
    from visionsweep.errors import ConfigError

    cfg = compose_cfg(tmp_path, ["logger=mlflow", f"paths.log_dir={tmp_path}"])
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow → ImportError
    with pytest.raises(ConfigError) as err:
        builders.build_loggers(cfg, tmp_path)
    assert str(err.value) == "logger=mlflow needs mlflow: pip install -e '.[dashboards]'"
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, digits_root) -> dict[str, Path]:
    """2 Optuna trials searching lr / weight decay / augmentation, plus a seed=1,2 sweep on the CLI."""
    root = tmp_path_factory.mktemp("dash")
    tiny = [o for o in TINY if not o.startswith("logger=")]
    loggers = "logger=[mlflow,tensorboard]" if HAVE_MLFLOW else "logger=tensorboard"
    proc = run_cli("train", "-m", "experiment=optuna_lr", *tiny, loggers,
                   "hydra.sweeper.n_trials=2", "seed=1,2", f"data.root={digits_root}",
                   f"paths.log_dir={root}", f"hydra.sweep.dir={root / 'sweep'}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "sweep": root / "sweep", "db": root / "mlflow.db"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 10) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode(errors="replace")


@pytest.fixture
def serve(tmp_path) -> Iterator:
    """``serve(cmd, ready_url)`` starts a server and waits for ``ready_url``; killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], ready: str, timeout: float = 90, **env: str) -> None:
        log = open(tmp_path / f"server{len(procs)}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env={**os.environ, "PYTHONWARNINGS": "ignore", **env},
                                start_new_session=True)  # its own group: workers it spawns go with it
        procs.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{cmd[0]} exited {proc.returncode}: {log.name}: "
                            f"{Path(log.name).read_text()[-2000:]}")
            try:
                _http(ready, timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        pytest.fail(f"{' '.join(cmd[:3])} did not answer {ready} within {timeout} s")

    yield start
    for proc in procs:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the group this fixture started, nothing else
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.mark.scaling  # end to end (a real mlflow server): in make test-scaling, to keep make test short
@pytest.mark.skipif(not HAVE_MLFLOW, reason=NO_EXTRA)
def test_mlflow_server_shows_the_sweep_as_one_experiment(sweep, serve, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{sweep['db']}",
           "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"], f"{url}/health",
          MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job runner processes: the UI and REST API only
    experiments = _http(f"{url}/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
    ours = [e for e in experiments if e["name"] == f"train-{sweep['sweep'].name}"]
    assert len(ours) == 1, [e["name"] for e in experiments]
    runs = _http(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [ours[0]["experiment_id"]]})["runs"]
    assert len(runs) == 2
    for run in runs:
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        job = Path(tags["run_dir"])
        assert job.parent == sweep["sweep"] and (job / "run.json").is_file()
        record = json.loads((job / "run.json").read_text())
        # the job's overrides, searched ones included, as params, next to the model's arguments
        for line in record["overrides"]:
            key, value = line.split("=", 1)
            assert params[key] == value, key
        assert {"optimizer.lr", "augmentation", "arch", "aug", "seed"} <= params.keys()
        assert tags["arch"] == "resnet10t" and tags["aug"] == params["augmentation"]
        assert tags["seed"] == params["seed"] == str(record["seed"])
        assert tags["mlflow.runName"] == f"resnet10t-{tags['aug']}-seed{tags['seed']}-job{job.name}"
        assert str(job) in tags["mlflow.note.content"]
        assert run["info"]["status"] == "FINISHED"
        assert metrics["val/acc"] == pytest.approx(record["metrics"]["val/acc"], abs=1e-6)
        assert metrics["test/acc"] == pytest.approx(record["metrics"]["test/acc"], abs=1e-6)
    if CHROMIUM is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium): no screenshot")
    shot = tmp_path / "mlflow_runs.png"
    page = f"{url}/#/experiments/{ours[0]['experiment_id']}/runs"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]  # let the app render
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,900", page],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 900)
        low, high = img.convert("L").getextrema()
        colours = len(img.convert("RGB").getcolors(maxcolors=1 << 20) or [])
    assert high - low > 100 and colours > 20  # the runs table was drawn, not a blank page


def _events(job: Path) -> list[Path]:
    return sorted((job / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.scaling  # end to end (a sweep logged to every dashboard): in make test-scaling, to keep make test short
def test_tensorboard_event_file_holds_scalars_test_metrics_and_hparams(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    jobs = sorted(p for p in sweep["sweep"].iterdir() if p.name.isdigit())
    assert len(jobs) == 2
    for job in jobs:
        files = _events(job)
        assert len(files) == 1, files  # fit and test in one event file
        acc = EventAccumulator(str(files[0]), size_guidance={"tensors": 0, "scalars": 0}).Reload()
        scalars = set(acc.Tags()["scalars"])
        assert {"val/acc", "val/loss", "train/loss", "test/acc"} <= scalars
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        hp = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
        record = json.loads((job / "run.json").read_text())
        assert hp["arch"] == "resnet10t" and hp["seed"] == record["seed"]
        assert {"aug", "optimizer.lr", "optimizer.weight_decay"} <= hp.keys()
        assert hp["aug"] == record["augmentation"] and "augmentation" not in hp  # one column, not two
        assert "trainer.max_epochs" not in hp  # constant across the sweep: not a column
        assert metadata.SESSION_END_INFO_TAG in content
        assert "hp_metric" not in scalars
        saved = (job / "tensorboard" / "hparams.yaml").read_text()
        assert "arch: resnet10t" in saved and "seed:" in saved and "backbone:" in saved


@pytest.mark.scaling  # end to end (a real tensorboard server): in make test-scaling, to keep make test short
def test_tensorboard_serves_the_runs_and_their_hparams(sweep, serve):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve([str(BIN / "tensorboard"), "--logdir", str(sweep["sweep"]), "--host", "127.0.0.1",
           "--port", str(port), "--load_fast=false", "--reload_interval=1"], f"{url}/data/runs")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(runs := _http(f"{url}/data/runs")) < 2:
        time.sleep(1)  # the first load of the event files runs in the background
    assert sorted(runs) == ["0/tensorboard", "1/tensorboard"]
    experiment = _http(f"{url}/data/plugin/hparams/experiment", {"experimentName": ""})
    columns = {h["name"] for h in experiment["hparamInfos"]}
    assert {"arch", "aug", "seed", "optimizer.lr", "optimizer.weight_decay"} <= columns
    assert {"val/acc", "test/acc"} <= {m["name"]["tag"] for m in experiment["metricInfos"]}
    groups = _http(f"{url}/data/plugin/hparams/session_groups",
                   {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
                    "colParams": [], "startIndex": 0, "sliceSize": 100})
    sessions = [s for g in groups["sessionGroups"] for s in g["sessions"]]
    assert len(sessions) == 2
    for s in sessions:
        record = json.loads((sweep["sweep"] / s["name"].split("/")[0] / "run.json").read_text())
        values = {m["name"]["tag"]: m["value"] for m in s["metricValues"]}
        assert values["test/acc"] == pytest.approx(record["metrics"]["test/acc"], abs=1e-6)


@pytest.mark.scaling  # end to end (a real optuna-dashboard server): in make test-scaling, to keep make test short
@pytest.mark.skipif(not HAVE_OPTUNA_DASHBOARD, reason=NO_EXTRA)
def test_optuna_dashboard_lists_the_trials_of_the_study(sweep, serve):
    import optuna

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    storage = f"sqlite:///{sweep['sweep'] / 'optuna.db'}"
    serve([str(BIN / "optuna-dashboard"), storage, "--host", "127.0.0.1", "--port", str(port)],
          f"{url}/api/studies")
    studies = _http(f"{url}/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["optuna_lr"]
    trials = _http(f"{url}/api/studies/{studies[0]['study_id']}")["trials"]
    expected = optuna.load_study(study_name="optuna_lr", storage=storage).trials
    assert len(trials) == len(expected) == 2
    for shown, real in zip(trials, expected):
        assert shown["number"] == real.number and shown["state"] == "Complete"
        assert shown["values"] == [pytest.approx(real.value)]
        params = {p["name"]: p["param_external_value"] for p in shown["params"]}
        assert params == {k: str(v) for k, v in real.params.items()}
        assert {"optimizer.lr", "optimizer.weight_decay", "augmentation", "seed"} <= params.keys()
