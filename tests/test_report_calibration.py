"""The report's calibration side on hand-written run dirs: lower-is-better calibration metrics, temperature
scaling columns, pooled reliability bins and their diagram, ``--reliability``, and the imbalance warning."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest
from PIL import Image
from test_report_cost import write_job

from visionsweep.errors import ConfigError
from visionsweep.report import build_report, collect
from visionsweep.runinfo import higher_is_better
from visionsweep.report.calibration import ece, imbalance_note, pooled_bins

N_BINS = 15


def _bins(filled: dict[int, tuple[float, float, int]]) -> dict:
    """15 reliability bins, empty (null, null, 0) except ``filled``: bin → (confidence, accuracy, count)."""
    out = {"confidence": [None] * N_BINS, "accuracy": [None] * N_BINS, "count": [0] * N_BINS}
    for i, (conf, acc, count) in filled.items():
        out["confidence"][i], out["accuracy"][i], out["count"][i] = conf, acc, count
    return out


def _reliability(filled: dict, before: dict | None = None) -> dict:
    rel = {"split": "test", "n_bins": N_BINS, **_bins(filled)}
    if before:
        rel["before"] = _bins(before)
    return rel


def _calibration(before: float, after: float, temperature: float) -> dict:
    return {"temperature": temperature, "fitted_on": "val", "measured_on": "test", "ece_before": before,
            "ece_after": after, "nll_before": 0.5, "nll_after": 0.4, "brier_before": 0.2, "brier_after": 0.19}


def _summary(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "summary.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("metric, higher", [
    ("val/ece", False), ("test/ece", False), ("val/nll", False), ("test/nll", False), ("val/brier", False),
    ("test/brier", False), ("val/loss", False), ("val/acc", True), ("test/f1_macro", True), ("val/precision", True),
    ("test/acc_balanced", True)])
def test_calibration_metrics_are_lower_is_better(metric, higher):
    assert higher_is_better(metric) is higher


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """x and y calibrated (with bins), z with bins only, w with neither. Not reported yet (see ``report``)."""
    root = tmp_path_factory.mktemp("calibration") / "sweep"
    write_job(root / "0", "x", 1, {"val/acc_best": 0.90, "test/ece": 0.030, "test/nll": 0.30},
              calibration=_calibration(0.080, 0.020, 1.4),
              reliability=_reliability({13: (0.90, 0.85, 30), 14: (0.97, 0.95, 70)},
                                       before={13: (0.92, 0.80, 40), 14: (0.99, 0.93, 60)}))
    write_job(root / "1", "x", 2, {"val/acc_best": 0.92, "test/ece": 0.010, "test/nll": 0.25},
              calibration=_calibration(0.082, 0.026, 1.6),
              reliability=_reliability({12: (0.83, 0.80, 10), 14: (0.95, 0.96, 90)}))
    write_job(root / "2", "y", 1, {"val/acc_best": 0.80, "test/ece": 0.050, "test/nll": 0.50},
              calibration=_calibration(0.120, 0.040, 2.0),
              reliability=_reliability({10: (0.70, 0.50, 50), 14: (0.95, 0.90, 50)}))
    write_job(root / "3", "z", 1, {"val/acc_best": 0.70, "test/ece": 0.200, "test/nll": 0.90},
              reliability=_reliability({7: (0.5, 0.3, 20)}))
    write_job(root / "4", "w", 1, {"val/acc_best": 0.60, "test/ece": 0.300, "test/nll": 1.20})
    return root


@pytest.fixture(scope="module")
def report(calibrated) -> dict:
    """The report of ``calibrated`` ranked by val/acc_best, written into ``calibrated/default``."""
    return build_report([calibrated], calibrated / "default")


def test_metric_test_ece_ranks_lowest_first_and_reliability_picks_a_configuration(calibrated, tmp_path):
    result = build_report([calibrated], tmp_path, metric="test/ece", reliability="model=w")
    rows = _summary(tmp_path)
    means = [float(r["test/ece mean"]) for r in rows]
    assert [r["configuration"] for r in rows] == ["model=x", "model=y", "model=z", "model=w"]  # 0.02 ... 0.3
    assert means == sorted(means) and means[0] == pytest.approx((0.030 + 0.010) / 2)
    assert "(lower is better)" in (tmp_path / "summary.md").read_text()
    assert result["metric"] == "test/ece"
    assert result["reliability"] == ["model=x"]  # w recorded no bins: the best alone (and a warning)
    result = build_report([calibrated], tmp_path, reliability="model=y")
    assert result["reliability"] == ["model=x", "model=y"]


def test_temperature_scaling_columns_and_sentence(calibrated, report):
    rows = {r["configuration"]: r for r in _summary(calibrated / "default")}
    assert float(rows["model=x"]["temperature"]) == pytest.approx(1.5)
    assert float(rows["model=x"]["ece_before"]) == pytest.approx(0.081)
    assert float(rows["model=x"]["ece_after"]) == pytest.approx(0.023)
    assert float(rows["model=y"]["ece_after"]) == pytest.approx(0.040)
    assert math.isnan(float(rows["model=z"]["temperature"]))
    assert float(rows["model=x"]["test/ece mean"]) == pytest.approx(0.020)  # an extra metric column
    # the mean over the three calibrated jobs: (0.080 + 0.082 + 0.120) / 3 → (0.020 + 0.026 + 0.040) / 3
    before, after = (0.080 + 0.082 + 0.120) / 3, (0.020 + 0.026 + 0.040) / 3
    sentence = f"temperature scaling: ECE {before:.3f} → {after:.3f} (mean over 3 jobs in 2 configurations"
    assert sentence in (calibrated / "default" / "summary.md").read_text()
    assert sentence in (calibrated / "default" / "report.html").read_text()


def test_no_calibration_columns_without_temperature_scaling(tmp_path):
    root = tmp_path / "sweep"
    write_job(root / "0", "x", 1, {"val/acc_best": 0.9})
    write_job(root / "1", "y", 1, {"val/acc_best": 0.8})
    result = build_report([root])
    assert "temperature" not in _summary(root)[0] and "temperature scaling" not in (root / "summary.md").read_text()
    assert not (root / "reliability.png").exists() and result["reliability"] == []


def test_bins_are_pooled_over_a_configurations_jobs(calibrated):
    jobs = collect.load_jobs(collect.find_job_dirs([calibrated]))
    x = next(c for c in collect.group_configurations(jobs) if c.label == "model=x")
    pooled = pooled_bins(x)
    assert pooled["count"] == [0] * 12 + [10, 30, 160] and pooled["jobs"] == 2
    assert pooled["confidence"][13] == pytest.approx(0.90) and pooled["accuracy"][12] == pytest.approx(0.80)
    assert pooled["confidence"][14] == pytest.approx((0.97 * 70 + 0.95 * 90) / 160)
    assert pooled["accuracy"][14] == pytest.approx((0.95 * 70 + 0.96 * 90) / 160)
    assert pooled["confidence"][0] is None and pooled["accuracy"][11] is None
    expected = (10 * abs(0.80 - 0.83) + 30 * abs(0.85 - 0.90)
                + 160 * abs((0.95 * 70 + 0.96 * 90) / 160 - (0.97 * 70 + 0.95 * 90) / 160)) / 200
    assert ece(pooled) == pytest.approx(expected)
    assert pooled["at_one"] == {"count": 0, "accuracy": None}  # bins written before the slot existed
    before = pooled_bins(x, "before")  # only job 0 recorded them
    assert before["count"][13:] == [40, 60] and before["jobs"] == 1


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


def test_reliability_diagram_shows_the_best_and_the_worst_calibrated(calibrated, report):
    # best by val/acc_best: x; the highest test/ece among the others with bins: z (w has no bins)
    assert report["reliability"] == ["model=x", "model=z"]
    w, h = _png_size(calibrated / "default" / "reliability.png")
    assert w > 600 and h > 300  # two panels side by side
    assert str(calibrated / "default" / "reliability.png") in report["files"]
    md = (calibrated / "default" / "summary.md").read_text()
    assert "reliability diagram (reliability.png): model=x and model=z" in md


def test_an_unknown_reliability_label_is_a_one_line_error_naming_the_labels(calibrated, tmp_path, capsys):
    from visionsweep.report.__main__ import main

    with pytest.raises(ConfigError) as err:
        build_report([calibrated], tmp_path, reliability="model=nope")
    message = str(err.value)
    assert "\n" not in message and "model=nope" in message
    assert all(label in message for label in ("'model=x'", "'model=y'", "'model=z'", "'model=w'"))
    with pytest.raises(SystemExit) as stop:
        main([str(calibrated), "--out", str(tmp_path), "--reliability", "resnet"])
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: report --reliability 'resnet': no such configuration; available: ")


def test_a_damaged_reliability_record_is_left_out_with_a_warning(tmp_path, caplog):
    root = tmp_path / "sweep"
    bad = _reliability({14: (0.9, 0.9, 10)})
    bad["count"] = bad["count"][:3]  # lists of different lengths
    write_job(root / "0", "x", 1, {"val/acc_best": 0.9}, reliability=bad)
    write_job(root / "1", "y", 1, {"val/acc_best": 0.8}, calibration={**_calibration(0.1, 0.05, 1.2),
                                                                        "temperature": "hot"})
    result = build_report([root])
    [w0, w1] = _warnings(caplog)
    assert w0.startswith(f"{root / '0' / 'run.json'} has values of the wrong type (reliability {{") \
        and w0.endswith("): ignored them")
    assert w1 == (f"{root / '1' / 'run.json'} has values of the wrong type (calibration['temperature'] 'hot'): "
                  "ignored them")
    assert result["reliability"] == [] and not (root / "reliability.png").exists()
    rows = {r["configuration"]: r for r in _summary(root)}
    assert math.isnan(float(rows["model=y"]["temperature"])) and float(rows["model=y"]["ece_after"]) == 0.05


def _imbalanced(root: Path, counts: dict[str, int], metrics: dict[str, float]) -> None:
    for n, (model, acc) in enumerate([("x", 0.9), ("y", 0.8)]):
        write_job(root / str(n), model, 1, {"val/acc_best": acc, **metrics},
                  data={"class_counts": {"train": counts, "val": {k: 5 for k in counts}}})


def test_imbalance_warning_for_plain_accuracy_on_imbalanced_classes(tmp_path, caplog):
    root = tmp_path / "sweep"
    _imbalanced(root, {"cat": 90, "dog": 10}, {"val/f1_macro": 0.7, "test/acc_balanced": 0.6})
    result = build_report([root])
    sentence = ("the training classes are imbalanced (largest / smallest = 9.0:1): plain accuracy hides small "
                "classes; rank by --metric val/f1_macro or test/acc_balanced")
    assert result["imbalance"] == sentence and _warnings(caplog) == [sentence]
    assert (root / "summary.md").read_text().count(sentence) == 1
    assert sentence in (root / "report.html").read_text()


def test_no_imbalance_warning_for_balanced_classes(tmp_path, caplog):
    root = tmp_path / "sweep"
    _imbalanced(root, {"cat": 50, "dog": 50}, {"val/f1_macro": 0.7})
    result = build_report([root])
    assert result["imbalance"] is None and _warnings(caplog) == []
    assert "imbalanced" not in (root / "summary.md").read_text()


@pytest.mark.parametrize("counts, metric, warned", [
    ({"cat": 30, "dog": 10}, "val/acc_best", False), ({"cat": 31, "dog": 10}, "test/acc", True),
    ({"cat": 90, "dog": 10}, "val/f1_macro", False), ({"cat": 90, "dog": 10}, "val/acc", True)])
def test_the_imbalance_warning_needs_a_ratio_over_3_and_plain_accuracy(tmp_path, counts, metric, warned):
    _imbalanced(tmp_path, counts, {"val/f1_macro": 0.7})
    assert (imbalance_note(collect.load_jobs(collect.find_job_dirs([tmp_path])), metric) is not None) is warned


def test_an_empty_training_class_is_infinitely_imbalanced_and_the_advice_fits_the_metrics(tmp_path):
    root = tmp_path / "sweep"
    _imbalanced(root, {"cat": 90, "dog": 0, "eel": 10}, {})
    result = build_report([root], metric="val/acc_best")
    assert "(largest / smallest = ∞:1)" in result["imbalance"]
    assert "--metric" not in result["imbalance"] and "class-balanced metric" in result["imbalance"]


def test_plot_reliability_takes_a_run_json_record_as_python_m_visionsweep_calibrate_passes_it(tmp_path):
    from visionsweep.report.calibration import plot_reliability

    record = {"split": "val", **_reliability({3: (0.25, 0.2, 5), 14: (0.97, 0.9, 40)},
                                             before={14: (0.99, 0.9, 45)})}
    path = plot_reliability([("best.ckpt $x$", record)], tmp_path / "reliability.png")
    w, h = _png_size(path)
    assert path == tmp_path / "reliability.png" and w > 300 and h > 300
    assert plot_reliability([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
