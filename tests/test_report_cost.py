"""The report's cost side on hand-written run dirs: cost columns, Pareto fronts, time to target, damaged cost."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from pathlib import Path

import pytest
import yaml
from PIL import Image

from visionsweep.report import build_report
from visionsweep.report.cost import pareto_front, si

# configuration → (val/acc_best per seed, latency_ms, train_s per seed, params, macs)
CONFIGS = {
    "a": ((0.90, 0.92), 5.0, (100.0, 110.0), 11_000_000, 1.8e9),
    "b": ((0.95, 0.95), 20.0, (50.0, 50.0), 25_000_000, 4.1e9),
    "c": ((0.85, 0.87), 30.0, (200.0, 220.0), 11_000_000, 1.8e9),  # worse than a at a higher latency, same size
    "d": ((0.95, 0.95), 20.0, (60.0, 60.0), 5_000_000, 0.6e9),  # b's twin on latency; slower to train
    "e": ((0.99, 0.97), 100.0, (300.0, 280.0), 60_000_000, 12e9),
}


def write_job(job: Path, model: str, seed: int, metrics: dict | None, status: str = "ok",
              curves: dict[str, list[float]] | None = None, augmentation: str | None = None, **fields) -> None:
    """A job as train.py leaves it: .hydra/overrides.yaml, run.json (with ``fields``), metrics.csv from ``curves``."""
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"model={model}", *([f"augmentation={augmentation}"] if augmentation else []), f"seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    run = {"status": status, "seed": seed, "backbone": model, "augmentation": augmentation or "none",
           "overrides": overrides,
           "metrics": metrics, **fields}
    (job / "run.json").write_text(json.dumps(run))
    if curves:
        names = list(curves)
        with (job / "metrics.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "step", *names])
            for epoch in range(len(curves[names[0]])):
                w.writerow([epoch, 10 * epoch, *(curves[n][epoch] for n in names)])


def _cost(latency: float, train_s: float, params: int, macs: float, **more) -> dict:
    return {"params": params, "trainable_params": params, "macs": int(macs), "image_size": 224,
            "latency_ms": latency, "latency_ms_p90": latency * 1.1, "latency_calls": 30,
            "throughput_img_s": 1000 / latency,
            "throughput_batch": 32, "device": "cpu", "peak_mem_mb": 100.0 + params / 1e6, "peak_mem_kind": "cpu_rss",
            "train_s": train_s, "train_img_s": 500.0, "device_hours": train_s / 3600, **more}


def _summary(sweep: Path) -> dict[str, dict[str, str]]:
    with (sweep / "summary.csv").open(newline="") as f:
        return {r["configuration"]: r for r in csv.DictReader(f)}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


def _dominated(i: int, points: list[tuple[float, float]], higher: bool = True) -> bool:
    """Brute force: another point is at least as good in metric and cost and strictly better in one."""
    m, c = points[i]
    for j, (m2, c2) in enumerate(points):
        if j == i or math.isnan(m2) or math.isnan(c2):
            continue
        as_good = (m2 >= m if higher else m2 <= m) and c2 <= c
        strictly = (m2 > m if higher else m2 < m) or c2 < c
        if as_good and strictly:
            return True
    return False


def _expected_front(points: list[tuple[float, float]], higher: bool = True) -> list[bool]:
    return [not (math.isnan(m) or math.isnan(c)) and not _dominated(i, points, higher)
            for i, (m, c) in enumerate(points)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cost") / "sweep"
    n = 0
    for model, (accs, latency, train_s, params, macs) in CONFIGS.items():
        for seed, (acc, t) in enumerate(zip(accs, train_s), start=1):
            write_job(root / str(n), model, seed, {"val/acc_best": acc},
                      cost=_cost(latency, t, params, macs), fit_seconds=t + 5)
            n += 1
    # a configuration without any cost (an old job without params/fit_seconds): NaN, never on a front
    write_job(root / str(n), "nocost", 1, {"val/acc_best": 0.999})
    build_report([root])
    return root


def test_summary_csv_has_the_cost_columns_with_means_and_sums(sweep):
    rows = _summary(sweep)
    header = list(next(iter(rows.values())))
    for col in ("params", "macs", "latency_ms", "throughput_img_s", "train_s", "time_to_target_s", "pareto",
                "pareto_train_s", "pareto_params", "peak_mem_mb", "device_hours", "train_img_s", "reached_target"):
        assert col in header, col
    for old in ("train s", "params (M)", "images/s"):
        assert old not in header
    assert header.index("pareto") == header.index("time_to_target_s") + 2  # after reached_target
    for model, (accs, latency, train_s, params, macs) in CONFIGS.items():
        row = rows[f"model={model}"]
        assert int(row["params"]) == params and int(row["macs"]) == int(macs)  # raw counts, not millions
        assert float(row["latency_ms"]) == pytest.approx(latency)
        assert float(row["throughput_img_s"]) == pytest.approx(1000 / latency)
        assert float(row["train_s"]) == pytest.approx(sum(train_s) / 2)  # cost.train_s, not fit_seconds
        assert float(row["device_hours"]) == pytest.approx(sum(train_s) / 3600)  # summed over seeds
        assert float(row["peak_mem_mb"]) == pytest.approx(100.0 + params / 1e6)
    missing = rows["model=nocost"]
    for col in ("params", "macs", "latency_ms", "train_s", "device_hours", "time_to_target_s"):
        assert math.isnan(float(missing[col])), col
    assert missing["pareto"] == missing["pareto_train_s"] == missing["pareto_params"] == "false"


@pytest.mark.parametrize("flag, axis", [("pareto", "latency_ms"), ("pareto_train_s", "train_s"),
                                        ("pareto_params", "params")])
def test_pareto_columns_match_a_brute_force_dominance_check(sweep, flag, axis):
    rows = _summary(sweep)
    labels = list(rows)
    points = [(float(rows[k]["val/acc_best mean"]), float(rows[k][axis])) for k in labels]
    expected = _expected_front(points)
    assert [rows[k][flag] for k in labels] == ["true" if e else "false" for e in expected]


def test_pareto_fronts_by_hand(sweep):
    rows = _summary(sweep)
    on = {flag: {k.split("=")[1] for k, r in rows.items() if r[flag] == "true"}
          for flag in ("pareto", "pareto_train_s", "pareto_params")}
    assert on["pareto"] == {"a", "b", "d", "e"}  # c is dominated by a; b and d tie, so both stay
    assert on["pareto_train_s"] == {"b", "e"}  # b trains fastest and beats a, c, d (d: b's accuracy, slower)
    assert on["pareto_params"] == {"d", "e"}  # d is the smallest and beats a, b (its accuracy, 5x the size), c


def test_human_tables_show_readable_costs(sweep):
    md = (sweep / "summary.md").read_text()
    line = next(r for r in md.splitlines() if r.startswith("| model=a "))
    assert "| 11M |" in line and "| 1.8G |" in line and "| 5.00 |" in line and "✓" in line
    front = next(r for r in md.splitlines() if r.startswith("- Pareto front of val/acc_best against latency_ms ("))
    assert set(front.split("): ", 1)[1].rstrip(".").split("; ")) == {"model=a", "model=b", "model=d", "model=e"}
    html = (sweep / "report.html").read_text()
    assert "<td>25M</td>" in html and "<td>20.00</td>" in html


def test_the_pareto_plots_are_drawn_with_the_front_marked(sweep):
    result = json.loads((sweep / "report.json").read_text())
    for name in ("pareto_latency.png", "pareto_train_s.png", "pareto_params.png"):
        path = sweep / name
        assert str(path) in result["files"]
        w, h = _image_size(path)
        assert w > 300 and h > 200
        with Image.open(path) as img:
            px = list(img.convert("RGB").getdata())
        assert sum(1 for r, g, b in px if r > 190 and g < 70 and b < 70) > 50  # the red rings and step line


def test_one_network_gets_one_latency_so_timing_noise_decides_no_front(tmp_path):
    """Two augmentations of one network: the better one, timed slower by chance, still dominates the other."""
    jobs = {("net", "strong"): (0.95, (2.5, 2.4)), ("net", "none"): (0.90, (2.2, 2.1)),
            ("big", "none"): (0.97, (9.0, 9.2))}
    n = 0
    for (model, aug), (acc, latencies) in jobs.items():
        for seed, latency in enumerate(latencies, start=1):
            params = 5_000_000 if model == "net" else 20_000_000
            write_job(tmp_path / str(n), model, seed, {"val/acc_best": acc}, augmentation=aug,
                      cost=_cost(latency, 100.0, params, params * 300))
            n += 1
    build_report([tmp_path])
    rows = _summary(tmp_path)
    strong, plain, big = (rows[f"model={m} augmentation={a}"] for m, a in jobs)
    assert float(strong["latency_ms"]) == float(plain["latency_ms"]) == pytest.approx((2.5 + 2.4 + 2.2 + 2.1) / 4)
    assert float(big["latency_ms"]) == pytest.approx(9.1)  # another network: its own timings
    assert float(strong["throughput_img_s"]) == float(plain["throughput_img_s"])
    assert (strong["pareto"], plain["pareto"], big["pareto"]) == ("true", "false", "true")


def test_pareto_front_ties_nan_and_direction():
    assert pareto_front([(0.9, 10.0), (0.9, 10.0)]) == [True, True]  # equal: neither dominates
    assert pareto_front([(0.9, 10.0), (0.9, 12.0)]) == [True, False]  # same metric, dearer
    assert pareto_front([(0.9, 10.0), (0.95, 10.0)]) == [False, True]  # same cost, worse
    assert pareto_front([(0.9, math.nan), (0.5, 99.0), (math.nan, 1.0)]) == [False, True, False]
    assert pareto_front([(0.1, 5.0), (0.2, 1.0)], higher_is_better=False) == [True, True]
    assert pareto_front([(0.3, 5.0), (0.2, 1.0)], higher_is_better=False) == [False, True]
    assert pareto_front([]) == []


@pytest.mark.parametrize("higher", [True, False])
def test_pareto_front_never_marks_a_dominated_point(higher):
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        # few distinct values, so that ties in one or both coordinates are common
        points = [(rng.choice([0.5, 0.6, 0.7, math.nan]) if rng.random() < 0.9 else math.nan,
                   float(rng.randint(1, 5))) for _ in range(n)]
        flags = pareto_front(points, higher)
        assert flags == _expected_front(points, higher), points
        assert not any(f and _dominated(i, points, higher) for i, f in enumerate(flags))
        finite = [p for p in points if not math.isnan(p[0])]
        assert not finite or any(flags)  # a non-empty set always has a front


def test_si_formats_counts():
    assert si(11_689_512) == "11.7M" and si(1.82e9) == "1.82G" and si(950) == "950" and si(25_000) == "25k"


def test_time_to_target_is_the_first_epoch_at_or_past_099_of_the_best(tmp_path):
    root = tmp_path / "sweep"
    # best val/acc of all jobs: 0.80 → target 0.792
    write_job(root / "0", "x", 1, {"val/acc_best": 0.80}, curves={"val/acc": [0.5, 0.79, 0.793, 0.80]},
              perf={"val_elapsed_s": [[0, 10.0], [1, 20.0], [2, 30.5], [3, 40.0]]})
    write_job(root / "1", "x", 2, {"val/acc_best": 0.60}, curves={"val/acc": [0.5, 0.6]},
              perf={"val_elapsed_s": [[0, 11.0], [1, 22.0]]})  # never reaches it
    write_job(root / "2", "y", 1, {"val/acc_best": 0.795}, curves={"val/acc": [0.6, 0.795, 0.7]},
              perf={"val_elapsed_s": [[0, 12.5], [1, 25.0], [2, 37.5]]})
    write_job(root / "3", "y", 2, {"val/acc_best": 0.792}, curves={"val/acc": [0.792, 0.5]},
              perf={"val_elapsed_s": [[0, 9.0], [1, 18.0]]})  # exactly the target, at epoch 0
    write_job(root / "4", "z", 1, {"val/acc_best": 0.80}, curves={"val/acc": [0.5, 0.80]},
              perf={"val_elapsed_s": [[0, 5.0]]})  # reached at epoch 1, whose time was not recorded
    write_job(root / "5", "w", 1, {"val/acc_best": 0.70}, curves={"val/acc": [0.7]})  # no perf at all
    result = build_report([root])
    target = 0.99 * 0.80
    assert result["time_to_target"]["metric"] == "val/acc"
    assert result["time_to_target"]["target"] == pytest.approx(target)
    assert result["time_to_target"]["fraction"] == pytest.approx(0.99)
    assert json.loads((root / "report.json").read_text())["time_to_target"]["target"] == pytest.approx(target)
    rows = _summary(root)
    assert float(rows["model=x"]["time_to_target_s"]) == pytest.approx(30.5)
    assert rows["model=x"]["reached_target"] == "1/2"
    assert float(rows["model=y"]["time_to_target_s"]) == pytest.approx((25.0 + 9.0) / 2)
    assert rows["model=y"]["reached_target"] == "2/2"
    assert math.isnan(float(rows["model=z"]["time_to_target_s"])) and rows["model=z"]["reached_target"] == "0/1"
    assert math.isnan(float(rows["model=w"]["time_to_target_s"]))
    md = (root / "summary.md").read_text()
    assert f"first reached {target:.4g} (0.99 × the best, 0.8)" in md
    assert "time to target: seconds until val/acc first reached 0.792" in (root / "report.html").read_text()
    assert _image_size(root / "time_to_target.png")[0] > 300


def test_time_to_target_of_a_lower_is_better_metric(tmp_path):
    root = tmp_path / "sweep"
    write_job(root / "0", "x", 1, {"val/loss": 0.5}, curves={"val/loss": [0.9, 0.502, 0.5]},
              perf={"val_elapsed_s": [[0, 3.0], [1, 6.0], [2, 9.0]]})
    write_job(root / "1", "y", 1, {"val/loss": 0.7}, curves={"val/loss": [0.9, 0.7]},
              perf={"val_elapsed_s": [[0, 3.0], [1, 6.0]]})
    result = build_report([root], metric="val/loss")
    assert result["time_to_target"]["target"] == pytest.approx(0.5 / 0.99)  # 0.50505: 0.502 is under it
    assert "first reached 0.5051 (the best ÷ 0.99, 0.5)." in (root / "summary.md").read_text()
    rows = _summary(root)
    assert float(rows["model=x"]["time_to_target_s"]) == pytest.approx(6.0)
    assert rows["model=y"]["reached_target"] == "0/1"
    assert list(rows) == ["model=x", "model=y"]  # the lower loss first


def test_old_jobs_fall_back_to_params_total_and_fit_seconds(tmp_path):
    root = tmp_path / "sweep"
    write_job(root / "0", "x", 1, {"val/acc_best": 0.9}, params={"total": 2_000_000}, fit_seconds=40.0)
    write_job(root / "1", "x", 2, {"val/acc_best": 0.8}, params={"total": 2_000_000}, fit_seconds=60.0)
    write_job(root / "2", "y", 1, {"val/acc_best": 0.7})
    build_report([root])
    rows = _summary(root)
    assert int(rows["model=x"]["params"]) == 2_000_000 and float(rows["model=x"]["train_s"]) == 50.0
    assert math.isnan(float(rows["model=x"]["latency_ms"])) and rows["model=x"]["pareto"] == "false"
    assert rows["model=x"]["pareto_params"] == "true" and rows["model=y"]["pareto_params"] == "false"
    md = (root / "summary.md").read_text()
    row_y = next(r for r in md.splitlines() if r.startswith("| model=y "))
    assert row_y.count("| — |") >= 6  # params, macs, latency, throughput, train_s, time to target ...
    assert not (root / "pareto_latency.png").exists() and (root / "pareto_params.png").is_file()
    assert not (root / "time_to_target.png").exists()  # no curves


def test_a_damaged_cost_is_ignored_with_one_warning_naming_the_file(tmp_path, caplog):
    root = tmp_path / "sweep"
    write_job(root / "0", "x", 1, {"val/acc_best": 0.9}, cost="fast")
    write_job(root / "1", "x", 2, {"val/acc_best": 0.8}, cost=_cost(4.0, 10.0, 1000, 2e6))
    write_job(root / "2", "y", 1, {"val/acc_best": 0.7}, cost={**_cost(2.0, 20.0, 1000, 2e6), "latency_ms": "2 ms"},
              perf={"val_elapsed_s": "soon"})
    result = build_report([root])
    assert _warnings(caplog) == [
        f"{root / '0' / 'run.json'} has values of the wrong type (cost 'fast'): ignored them",
        f"{root / '2' / 'run.json'} has values of the wrong type (cost['latency_ms'] '2 ms'; "
        "perf['val_elapsed_s'] 'soon'): ignored them"]
    rows = _summary(root)
    assert float(rows["model=x"]["latency_ms"]) == 4.0  # job 1's alone
    assert math.isnan(float(rows["model=y"]["latency_ms"])) and float(rows["model=y"]["train_s"]) == 20.0
    assert len(result["rows"]) == 2 and (root / "report.html").is_file()


HOSTILE = "<b>|*"


def test_labels_are_escaped_in_the_new_sections(tmp_path):
    root = tmp_path / "sweep"
    bins = {"split": "test", "n_bins": 2, "confidence": [0.4, 0.9], "accuracy": [0.5, 0.8], "count": [3, 7]}
    write_job(root / "0", HOSTILE, 1, {"val/acc_best": 0.9, "test/ece": 0.1}, cost=_cost(4.0, 10.0, 1000, 2e6),
              curves={"val/acc": [0.5, 0.9]}, perf={"val_elapsed_s": [[0, 1.0], [1, 2.0]]}, reliability=bins)
    write_job(root / "1", "plain", 1, {"val/acc_best": 0.8, "test/ece": 0.2}, cost=_cost(8.0, 20.0, 2000, 4e6),
              reliability=bins)
    result = build_report([root])
    assert result["reliability"] == [f"model={HOSTILE}", "model=plain"]
    md = (root / "summary.md").read_text()
    assert "<b>" not in md
    front = next(line for line in md.splitlines() if line.startswith("- Pareto front of"))
    assert front.endswith(": model=&lt;b&gt;\\|\\*.")
    assert "- reliability diagram (reliability.png): model=&lt;b&gt;\\|\\* and model=plain;" in md
    html = (root / "report.html").read_text()
    assert "<b>|" not in html
    assert "Pareto front of val/acc_best against latency_ms (no configuration is as good and cheaper): " \
           "model=&lt;b&gt;|*." in html
    assert "reliability diagram (reliability.png): model=&lt;b&gt;|* and model=plain;" in html


def test_report_cli_prints_costs_and_a_rerun_gives_the_same_summary(sweep, capsys):
    from visionsweep.report.__main__ import main

    before = {str(p): p.stat().st_mtime_ns for p in sweep.glob("*/run.json")}
    main([str(sweep), "--out", str(sweep / "again")])
    out = capsys.readouterr().out
    line = next(r for r in out.splitlines() if r.startswith("| model=a "))
    assert "11M" in line and "5.00" in line
    assert {str(p): p.stat().st_mtime_ns for p in sweep.glob("*/run.json")} == before
    assert (sweep / "again" / "summary.csv").read_text() == (sweep / "summary.csv").read_text()
