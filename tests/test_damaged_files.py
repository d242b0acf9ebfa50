"""Damaged files in run dirs (cut off by a kill, garbage, edited): the report and the sweep ledger say which
file and what they did with it, and never compute from the damaged part."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from visionsweep import ledger, runinfo
from visionsweep.report import build_report, collect
from visionsweep.runinfo import read_curves

# job number → (augmentation, seed, val/acc_best in run.json, val/acc per epoch in metrics.csv)
JOBS = {
    0: ("none", 1, 0.90, [0.50, 0.90, 0.70, 0.99]),  # best epoch 3; 1 without its last row
    1: ("none", 2, 0.80, [0.50, 0.60, 0.80]),  # best epoch 2
    2: ("basic", 1, 0.70, [0.50, 0.70]),  # best epoch 1
    3: ("basic", 2, 0.60, [0.60, 0.50]),  # best epoch 0
}


def _write_job(job: Path, aug: str, seed: int, acc: float, curve: list[float]) -> None:
    """A finished job as train.py leaves it (Hydra's .hydra/, run.json, Lightning's metrics.csv)."""
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"augmentation={aug}", f"seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"seed": seed, "model": {"backbone": "resnet18"}, "augmentation": {"name": aug}}))
    run = {"status": "ok", "seed": seed, "backbone": "resnet18", "augmentation": aug, "overrides": overrides,
           "metrics": {"val/acc_best": acc}, "fit_seconds": 10.0 * seed, "config_hash": f"hash{seed}"}
    (job / "run.json").write_text(json.dumps(run, indent=2))
    with (job / "metrics.csv").open("w", newline="") as f:  # csv's \r\n line ends, as Lightning's writer
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "val/acc", "val/loss"])
        for epoch, value in enumerate(curve):
            writer.writerow([epoch, 10 * epoch, value, round(1 - value, 2)])


@pytest.fixture()
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    for num, job in JOBS.items():
        _write_job(root / str(num), *job)
    return root


def _summary(sweep: Path) -> dict[str, dict[str, str]]:
    return {r["configuration"]: r for r in csv.DictReader((sweep / "summary.csv").open())}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("keep", ["3,30,0.99", "3,30,0.99,0.0"], ids=["columns-missing", "last-cell-cut"])
def test_a_metrics_csv_cut_mid_line_loses_that_row_only(sweep, caplog, keep):
    path = sweep / "0" / "metrics.csv"
    text = path.read_bytes()
    path.write_bytes(text[:text.index(b"3,30,")] + keep.encode())  # killed while writing epoch 3
    build_report([sweep])
    rows = _summary(sweep)
    assert float(rows["augmentation=none"]["best epoch"]) == 1.5  # (1 + 2) / 2: epoch 3's 0.99 is not used
    assert float(rows["augmentation=basic"]["best epoch"]) == 0.5  # (1 + 0) / 2, untouched
    assert float(rows["augmentation=none"]["val/acc_best mean"]) == pytest.approx(0.85)
    assert _warnings(caplog) == [f"{path} line 5 is cut off: ignored that row"]


@pytest.mark.parametrize("content, why", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe garbage", "has no metrics header (epoch, step, ...)"),
    (b"epoch,step,val/acc,val/loss\r\nx,0,0.5,0.5\r\n0,1\r\n1,10,0.9,0.1\r\n0.5,20,abc,0.1\r\n",
     "is damaged throughout (line 2 has 'x' in epoch, not a number; line 3 has 2 of 4 columns; "
     "line 5 has epoch '0.5', not a whole number)"),
], ids=["binary", "rows-edited"])
def test_a_metrics_csv_damaged_throughout_gives_no_curves(sweep, caplog, content, why):
    path = sweep / "1" / "metrics.csv"
    path.write_bytes(content)
    job = collect.load_job(sweep / "1")
    assert job.curves == {} and collect.best_epoch(job, "val/acc_best") is None
    assert job.metrics == {"val/acc_best": 0.80}  # run.json is fine
    assert _warnings(caplog) == [f"{path} {why}: left out the job's curves"]


def test_an_edited_row_in_the_middle_is_dropped(sweep, caplog):
    path = sweep / "0" / "metrics.csv"
    lines = path.read_bytes().split(b"\r\n")
    lines[4] = b"3,30,0.9\xff9,0.01"  # epoch 3 (the best): a stray byte in its value
    path.write_bytes(b"\r\n".join(lines))
    curves = read_curves(path)
    assert curves["val/acc"] == [(0, 0.50), (1, 0.90), (2, 0.70)]
    assert curves["val/loss"] == [(0, 0.50), (1, 0.10), (2, 0.30)]
    assert _warnings(caplog) == [f"{path} line 5 has bytes that are not text in val/acc: ignored that row"]


RUN_DAMAGE = {  # run.json content → what the warning says is wrong with it
    "cut": (b'{\n  "status": "ok",\n  "seed": 1,\n  "metr',
            "is not valid JSON (Unterminated string starting at: line 4 column 3)"),
    "binary": (b"\x00\xff\xfe\x89 not json", "is not UTF-8 text (byte 1)"),
    "list": (b'[{"status": "ok"}]', "holds a JSON list, not a JSON object"),
    "empty": (b"", "is empty"),
    "metrics-a-string": (b'{"status": "ok", "seed": 1, "metrics": "x"}',
                         "has metrics 'x' (not a JSON object)"),
    "status-a-number": (b'{"status": 5, "metrics": {"val/acc_best": 0.9}}',
                        "has status 5 (not one of running, ok, pruned, failed, interrupted)"),
}


@pytest.mark.parametrize("kind", list(RUN_DAMAGE))
def test_a_damaged_run_json_leaves_the_job_out(sweep, caplog, kind):
    content, why = RUN_DAMAGE[kind]
    path = sweep / "0" / "run.json"
    path.write_bytes(content)
    jobs = collect.load_jobs(collect.find_job_dirs([sweep]))
    assert [j.path.name for j in jobs] == ["1", "2", "3"]
    assert _warnings(caplog) == [f"{path} {why}: job left out of the report"]


def test_the_report_is_computed_without_the_job_whose_run_json_is_damaged(sweep, caplog):
    path = sweep / "0" / "run.json"
    path.write_bytes(RUN_DAMAGE["cut"][0])
    result = build_report([sweep])
    row = _summary(sweep)["augmentation=none"]
    assert int(row["seeds"]) == 1 and float(row["val/acc_best mean"]) == pytest.approx(0.80)  # job 1 alone
    assert float(row["best epoch"]) == 2.0 and float(row["train_s"]) == 20.0
    assert result["failed"] == []  # left out, not counted as a failure
    assert _warnings(caplog) == [f"{path} {RUN_DAMAGE['cut'][1]}: job left out of the report"]
    # and the report itself says so, in each document (not only on the console)
    line = f"{path} {RUN_DAMAGE['cut'][1]}: job left out of the report"
    assert result["left_out"] == [line]
    md = (sweep / "summary.md").read_text()
    assert "## Left out (damaged)" in md and md.count("job left out of the report") == 1
    assert "Left out (damaged)" in (sweep / "report.html").read_text()


def test_fields_of_the_wrong_type_are_ignored_not_used(sweep, caplog):
    path = sweep / "1" / "run.json"
    run = json.loads(path.read_text())
    run.update(fit_seconds="x", params=[1], metrics={"val/acc_best": "0.99", "val/loss": 0.2})
    path.write_text(json.dumps(run))
    build_report([sweep])
    row = _summary(sweep)["augmentation=none"]
    assert int(row["seeds"]) == 1 and float(row["val/acc_best mean"]) == pytest.approx(0.90)  # job 0 alone
    assert float(row["train_s"]) == 10.0 and float(row["best epoch"]) == 2.5  # curves still read: (3 + 2) / 2
    assert _warnings(caplog) == [f"{path} has values of the wrong type (fit_seconds 'x'; params [1]; "
                                 "metrics['val/acc_best'] '0.99'): ignored them"]


def test_damaged_yaml_files_fall_back_or_leave_the_job_out(sweep, caplog):
    (sweep / "2" / ".hydra" / "config.yaml").write_text("model: [resnet18\n")
    (sweep / "3" / ".hydra" / "overrides.yaml").write_bytes(b"\xff\xfe- seed=2\n")  # run.json has them too
    both = sweep / "1" / ".hydra" / "overrides.yaml"
    both.write_text("{not: a list}\n")
    run = json.loads((sweep / "1" / "run.json").read_text())
    del run["overrides"]
    (sweep / "1" / "run.json").write_text(json.dumps(run))
    build_report([sweep])
    rows = _summary(sweep)
    assert int(rows["augmentation=basic"]["seeds"]) == 2 and int(rows["augmentation=none"]["seeds"]) == 1
    assert float(rows["augmentation=basic"]["val/acc_best mean"]) == pytest.approx(0.65)
    assert _warnings(caplog) == [
        f"{both} holds {{'not': 'a list'}}, not a list of overrides: job left out of the report "
        "(its configuration is unknown)",
        f"{sweep / '2' / '.hydra' / 'config.yaml'} is not valid YAML (line 2): ignored it",
        f"{sweep / '3' / '.hydra' / 'overrides.yaml'} is not UTF-8 text (byte 0): used the overrides in "
        "run.json instead"]


def test_a_damaged_optuna_db_is_left_out_and_the_report_finishes(sweep, caplog):
    (sweep / "optuna.db").write_bytes(b"SQLite format 3\x00" + b"\x00" * 84 + b"garbage" * 100)
    result = build_report([sweep])
    assert result["studies"] == [] and len(result["rows"]) == 2
    [line] = _warnings(caplog)
    assert line.startswith(f"{sweep / 'optuna.db'} is a damaged SQLite database (") \
        and line.endswith("): left out of the report")


def test_report_cli_names_each_damaged_file_and_fails_in_one_line_when_all_are(sweep):
    from conftest import run_cli

    for num in JOBS:
        (sweep / str(num) / "run.json").write_text("[]")
    proc = run_cli("report", str(sweep))
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 5
    assert lines[:4] == [f"{sweep / str(n) / 'run.json'} holds a JSON list, not a JSON object: job left out "
                         "of the report" for n in JOBS]
    assert lines[4] == (f"error: report: all 4 run dirs are damaged, nothing to report (first: "
                        f"{sweep / '0' / 'run.json'} holds a JSON list, not a JSON object); fix or remove them")


def test_the_ledger_re_runs_a_job_whose_run_json_is_damaged_and_says_so(sweep, caplog):
    from hydra_plugins.visionsweep_basic.basic_sweeper import VisionSweepBasicSweeper

    for num in (2, 3):  # not run yet
        (sweep / str(num) / "run.json").unlink()
    (sweep / "0" / "run.json").write_text('{"status": "ok", "config_hash": "hash1"')  # cut off
    (sweep / "1" / "run.json").write_text('{"status": ["ok"], "config_hash": "hash2"}')
    (sweep / "multirun.yaml").write_bytes(b"hydra: {overrides: {task: [seed=1,2\n")
    entries = ledger.read(sweep)
    assert [entries[n].status for n in range(4)] == ["damaged", "damaged", "missing", "missing"]
    sweeper = VisionSweepBasicSweeper(max_batch_size=None)
    sweeper.config = OmegaConf.create({"hydra": {"overrides": {"task": ["seed=1,2"]}}})
    jobs = [[f"augmentation={a}", f"seed={s}"] for a, s, _, _ in JOBS.values()]
    plan = sweeper._plan(sweep, [jobs])
    assert [(num, action) for num, action, _ in plan] == [(0, "run"), (1, "run"), (2, "run"), (3, "run")]
    assert _warnings(caplog) == [
        f"{sweep / 'multirun.yaml'} is not valid YAML (line 2): not checked against this sweep's overrides "
        "(it is rewritten with them)",
        f"{sweep / '0' / 'run.json'} is not valid JSON (Expecting ',' delimiter: line 1 column 40): "
        "job 0 will be re-run",
        f"{sweep / '1' / 'run.json'} has status ['ok'] (not one of running, ok, pruned, failed, interrupted): "
        "job 1 will be re-run"]
    view = json.loads(ledger.write(sweep, {n: a for n, a, _ in plan}).read_text())
    assert view["0"] == {"status": "damaged", "config_hash": None, "action": "run"}


def test_a_damaged_saved_config_is_not_compared_and_says_so(sweep, caplog):
    assert ledger.saved_config(sweep / "3") == {"seed": 2, "model": {"backbone": "resnet18"},
                                                "augmentation": {"name": "basic"}}
    (sweep / "2" / ".hydra" / "config.yaml").write_bytes(b"seed: 1\nmodel: {backbone: resn")
    assert ledger.saved_config(sweep / "2") is None
    assert _warnings(caplog) == [f"{sweep / '2' / '.hydra' / 'config.yaml'} is not valid YAML (line 2): "
                                 "job 2's config was not compared with this sweep's"]


def test_runinfo_readers_treat_a_damaged_file_as_absent_with_a_warning(tmp_path, caplog):
    (tmp_path / "run.json").write_text('{"status": "ok", "wandb_id": "ab')
    (tmp_path / "perf.json").write_bytes(b"\xff\xfe{}")
    assert runinfo.load(tmp_path) == {} and runinfo.read_json(tmp_path / "perf.json") is None
    assert runinfo.read_json(tmp_path / "absent.json") is None and runinfo.load(tmp_path / "absent") == {}
    assert _warnings(caplog) == [
        f"{tmp_path / 'run.json'} is not valid JSON (Unterminated string starting at: line 1 column 30): "
        "ignored it",
        f"{tmp_path / 'perf.json'} is not UTF-8 text (byte 0): left out of run.json"]


def test_a_resumed_run_keeps_the_intact_rows_of_a_damaged_metrics_csv_and_a_copy_of_it(tmp_path, caplog):
    """Lightning replaces metrics.csv when a run resumes in its dir: the intact earlier epochs are carried
    over, the cut row is not, and the damaged file is kept aside (named in one warning)."""
    from visionsweep.utils.safe_io import AtomicExperimentWriter

    path = tmp_path / "metrics.csv"
    damaged = b"epoch,step,val/acc\r\n0,9,0.5\r\n1,19,0.75\r\n2,29,0.9"  # epoch 2's row cut by a kill
    path.write_bytes(damaged)
    with caplog.at_level(logging.WARNING):
        writer = AtomicExperimentWriter(str(tmp_path))
    writer.log_metrics({"val/acc": 0.95, "epoch": 2}, step=29)  # the resumed run logs epoch 2 again
    writer.save()
    rows = list(csv.DictReader(path.open()))
    assert [(r["epoch"], r["val/acc"]) for r in rows] == [("0", "0.5"), ("1", "0.75"), ("2", "0.95")]
    assert (tmp_path / "metrics.damaged.csv").read_bytes() == damaged
    assert _warnings(caplog) == [f"{path} line 4 is cut off: ignored that row (the damaged file is kept as "
                                 "metrics.damaged.csv)"]
