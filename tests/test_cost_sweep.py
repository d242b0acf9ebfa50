"""Issue 23 end to end: a real tiny sweep (2 architectures x 2 seeds, calibrated) and the report of its costs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import FAST, run_cli

pytestmark = pytest.mark.scaling  # four training processes and a report (~1-2 minutes)

ARCHS = ("resnet10t", "resnet34")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, digits_root) -> Path:
    root = tmp_path_factory.mktemp("cost_sweep") / "sweep"
    proc = run_cli("train", "-m", *FAST, "data=digits", f"data.root={digits_root}", "data.train_per_class=20",
                   f"model={','.join(ARCHS)}", "seed=1,2", "trainer.max_epochs=3", "calibrate=true", "++threads=1",
                   f"hydra.sweep.dir={root}", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = run_cli("report", str(root))
    assert report.returncode == 0, report.stderr[-3000:]
    return root


def _summary(root: Path) -> dict[str, dict[str, str]]:
    with (root / "summary.csv").open(newline="") as f:
        return {r["arch"]: r for r in csv.DictReader(f)}


def test_every_job_recorded_its_cost_and_calibration(sweep):
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/run.json"))]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    for r in records:
        cost = r["cost"]
        assert cost["latency_ms"] > 0 and cost["throughput_img_s"] > 0 and cost["train_s"] > 0
        assert cost["params"] > 1e6 and cost["macs"] > 1e6 and cost["device_hours"] > 0
        assert len(r["perf"]["val_elapsed_s"]) == 3  # one wall-clock time per validated epoch
        assert r["calibration"]["temperature"] > 0 and "ece_after" in r["calibration"]


def test_the_summary_has_the_cost_columns_and_the_bigger_model_costs_more(sweep):
    rows = _summary(sweep)
    assert set(rows) == set(ARCHS)
    for column in ("params", "macs", "latency_ms", "throughput_img_s", "train_s", "time_to_target_s", "pareto",
                   "temperature", "ece_before", "ece_after"):
        assert all(rows[a][column] != "" for a in ARCHS), column
    small, big = rows["resnet10t"], rows["resnet34"]
    for column in ("params", "macs", "latency_ms"):  # resnet34: 3x the blocks at the same width
        assert float(big[column]) > float(small[column]) > 0, column
    assert float(big["throughput_img_s"]) < float(small["throughput_img_s"])


@pytest.mark.parametrize("flag, axis", [("pareto", "latency_ms"), ("pareto_train_s", "train_s"),
                                        ("pareto_params", "params")])
def test_the_pareto_flags_follow_the_numbers(sweep, flag, axis):
    rows = list(_summary(sweep).values())
    metric = next(k for k in rows[0] if k.endswith(" mean"))
    points = [(float(r[metric]), float(r[axis])) for r in rows]
    for (m, c), r in zip(points, rows):
        dominated = any(m2 >= m and c2 <= c and (m2 > m or c2 < c) for m2, c2 in points)
        assert r[flag] == ("false" if dominated else "true"), (r, points)
    assert any(r[flag] == "true" for r in rows)  # the cheapest or the best is always on the front


def test_the_cost_plots_open_and_the_report_names_them(sweep):
    result = json.loads((sweep / "report.json").read_text())
    for name in ("pareto_latency.png", "pareto_train_s.png", "pareto_params.png", "time_to_target.png",
                 "reliability.png"):
        assert str(sweep / name) in result["files"], name
        with Image.open(sweep / name) as img:
            img.verify()
        with Image.open(sweep / name) as img:
            assert img.size[0] > 300 and img.size[1] > 200
    target = result["time_to_target"]  # 0.99 x the best val/acc any job reached
    best = max(json.loads(p.read_text())["metrics"]["val/acc_best"] for p in sweep.glob("*/run.json"))
    assert target["metric"] == "val/acc" and target["target"] == pytest.approx(0.99 * best, abs=1e-6)


def test_a_second_report_recomputes_nothing(sweep):
    before = (sweep / "summary.csv").read_bytes()
    report = run_cli("report", str(sweep))
    assert report.returncode == 0, report.stderr[-2000:]
    assert (sweep / "summary.csv").read_bytes() == before  # from what the jobs recorded: no re-timing
