"""The sweep report on synthetic run folders: statistics by hand, files, HTML rendered in Chromium."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from visionsweep.report import build_report
from visionsweep.report.stats import mean_ci, paired

# arch → augmentation → seed → final val/acc_best
RESULTS = {
    "resnet18": {"none": {1: 0.90, 2: 0.92, 3: 0.94}, "basic": {1: 0.80, 2: 0.83, 3: 0.81}},
    "vgg19": {"none": {1: 0.95, 2: 0.96, 3: 0.97}, "basic": {1: 0.70, 2: 0.72, 3: 0.71}},
}


def _write_job(job: Path, arch: str, aug: str, seed: int, acc: float | None, error: str | None = None) -> None:
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"model={arch}", f"augmentation={aug}", f"seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"seed": seed, "model": {"backbone": arch}, "augmentation": {"name": aug}}))
    run = {"status": "failed" if error else "ok", "error": error, "seed": seed, "backbone": arch,
           "augmentation": aug, "overrides": overrides, "fit_seconds": 10.0 + seed,
           "train_images_per_s": 100.0, "params": {"total": 11_000_000}}
    if acc is not None:
        run["metrics"] = {"val/acc_best": acc, "val/acc": acc - 0.01, "test/acc": acc - 0.02}
        with (job / "metrics.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "step", "val/acc", "val/loss"])
            for epoch, frac in enumerate((0.5, 0.9, 1.0, 0.99)):  # best at epoch 2
                w.writerow([epoch, 10 * epoch, acc * frac, 1 - acc * frac])
    (job / "run.json").write_text(json.dumps(run))


@pytest.fixture()
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    n = 0
    for arch, augs in RESULTS.items():
        for aug, seeds in augs.items():
            for seed, acc in seeds.items():
                _write_job(root / str(n), arch, aug, seed, acc)
                n += 1
    # a failed job of an existing configuration, and one that died before writing run.json
    _write_job(root / str(n), "vgg19", "none", 4, None, error="CUDA out of memory")
    early = root / str(n + 1)
    (early / ".hydra").mkdir(parents=True)
    (early / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=vgg19", "augmentation=basic", "seed=5"]))
    (early / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 5}))
    # what utils.cli.guarded leaves for a job that failed before train() wrote run.json
    (early / "run.json").write_text(json.dumps({"status": "failed", "error_type": "DataError",
                                                "error": "data.root '/x' does not exist"}))
    return root


def test_mean_ci_matches_hand_computation():
    mean, half = mean_ci([0.90, 0.92, 0.94])
    # sd = 0.02, sem = 0.02 / sqrt(3), t(0.975, df=2) = 4.302653
    assert mean == pytest.approx(0.92)
    assert half == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_ci([0.5])[1])


def test_paired_comparison_over_shared_seeds():
    result = paired({1: 0.95, 2: 0.96, 3: 0.97}, {1: 0.90, 2: 0.92, 3: 0.94, 9: 0.1}, "other")
    assert result.seeds == [1, 2, 3] and result.wins == 3
    assert result.diffs == pytest.approx([0.05, 0.04, 0.03])
    assert result.mean == pytest.approx(0.04) and result.holds
    close = paired({1: 0.91, 2: 0.90}, {1: 0.90, 2: 0.92}, "close")
    assert close.wins == 1 and not close.holds and "1 of 2" in close.verdict


def test_paired_ci_and_p_are_the_paired_t_tests_and_follow_the_metric_direction():
    from scipy import stats

    result = paired({1: 0.95, 2: 0.97, 3: 0.96}, {1: 0.90, 2: 0.93, 3: 0.94}, "other", confidence=0.9)
    assert result.ci == pytest.approx(mean_ci(result.diffs, 0.9)[1])  # t-interval of the mean difference
    assert result.p_value == pytest.approx(stats.ttest_1samp(result.diffs, 0.0).pvalue)
    loss = paired({1: 0.10, 2: 0.12}, {1: 0.20, 2: 0.21}, "worse loss", higher_is_better=False)
    assert loss.diffs == pytest.approx([0.10, 0.09]) and loss.wins == 2 and loss.holds
    one = paired({1: 0.9}, {1: 0.8}, "one seed")
    assert one.mean == pytest.approx(0.1) and math.isnan(one.ci) and math.isnan(one.p_value)


def test_report_table_statistics_and_failures(sweep):
    result = build_report([sweep])
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["configuration"] for r in rows] == [
        "model=vgg19 augmentation=none", "model=resnet18 augmentation=none",
        "model=resnet18 augmentation=basic", "model=vgg19 augmentation=basic"]
    for row in rows:
        arch, aug = row["arch"], row["augmentation"]
        mean, half = mean_ci(list(RESULTS[arch][aug].values()))
        assert float(row["val/acc_best mean"]) == pytest.approx(mean)
        assert float(row["val/acc_best ci95"]) == pytest.approx(half)
        assert int(row["seeds"]) == 3
        assert float(row["best epoch"]) == 2.0
        assert float(row["test/acc mean"]) == pytest.approx(mean - 0.02)
    failed = {r["configuration"]: int(r["failed"]) for r in rows}
    assert failed == {"model=vgg19 augmentation=none": 1, "model=resnet18 augmentation=none": 0,
                      "model=resnet18 augmentation=basic": 0, "model=vgg19 augmentation=basic": 1}
    md = (sweep / "summary.md").read_text()
    assert "CUDA out of memory" in md and "does not exist" in md  # both failures listed with their error
    assert "| DataError |" in md
    assert len(result["failed"]) == 2
    # the best configuration (vgg19 + none) beats every other one on all three seeds
    assert len(result["paired"]) == 3 and all(p["wins"] == 3 for p in result["paired"])
    _check_curves(sweep / "curves.png", n_configs=4)
    _check_means(sweep / "means.png", [mean_ci(list(RESULTS[r["arch"]][r["augmentation"]].values()))[0]
                                       for r in rows])
    _check_heatmap(sweep / "heatmap.png")


def _rgb(path: Path) -> np.ndarray:
    """A PNG decoded (after PIL's integrity check) as an H x W x 3 uint8 array."""
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] > 300 and img.size[1] > 200, img.size
        return np.asarray(img.convert("RGB"))


def _near(img: np.ndarray, colour, tol: int) -> np.ndarray:
    return np.abs(img.astype(int) - np.asarray(colour, dtype=int)).max(axis=2) <= tol


def _runs(mask: np.ndarray, min_len: int = 3) -> list[tuple[int, int]]:
    """(start, end) of the runs of True in a 1-D mask at least ``min_len`` long."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return [(a, b) for a, b in zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]) if b - a >= min_len]


def _check_curves(path: Path, n_configs: int) -> None:
    """One line per configuration: matplotlib's first ``n_configs`` cycle colours drawn, not the next one."""
    img = _rgb(path)
    cycle = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    drawn = [int(_near(img, c, 0).sum()) for c in cycle]
    assert min(drawn[:n_configs]) >= 200 and max(drawn[n_configs:]) < 20, drawn


def _check_means(path: Path, means_ranked: list[float], higher_is_better: bool = True) -> list:
    """One diamond per configuration, best first (a score's sink from left to right, a loss's rise), each with
    its whole CI: two caps per configuration, none cut off by the axes."""
    from visionsweep.report.render import CI_COLOUR, MEAN_COLOUR

    img = _rgb(path)
    blue = _near(img, _hex(MEAN_COLOUR), 8)
    centres = []  # (row, column) of each diamond: the columns it spans (a seed's dot may split it in two)
    for a, b in _runs(blue.any(axis=0), min_len=5):
        rows, _ = np.nonzero(blue[:, a:b])
        centres.append((rows.mean(), (a + b) / 2))
    assert len(centres) == len(means_ranked), centres
    ys = [y for y, _ in centres]
    assert means_ranked == sorted(means_ranked, reverse=higher_is_better)
    assert ys == sorted(ys, reverse=not higher_is_better) and len(set(np.round(ys))) == len(ys), centres
    # a cap: a horizontal run of the CI colour about as wide as the diamond, at a column through a diamond
    ci = _near(img, _hex(CI_COLOUR), 30)
    spans = []  # per diamond: (its row, the rows of its two caps)
    for y, x in centres:
        caps = _runs(ci[:, int(x) - 12:int(x) + 13].sum(axis=1) >= 15, min_len=1)
        assert len(caps) == 2, (x, caps)
        spans.append((y, [(a + b) / 2 for a, b in caps]))
    return spans


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def _check_heatmap(path: Path) -> None:
    """The arch x augmentation grid: each cell in viridis at its mean (normalised min..max), in its place."""
    import matplotlib

    img = _rgb(path)
    means = {(arch, aug): float(np.mean(list(seeds.values()))) for arch, augs in RESULTS.items()
             for aug, seeds in augs.items()}
    lo, hi = min(means.values()), max(means.values())
    centre = {}
    for key, mean in means.items():
        colour = np.round(np.asarray(matplotlib.colormaps["viridis"]((mean - lo) / (hi - lo))[:3]) * 255)
        ys, xs = np.nonzero(_near(img, colour, 3))
        assert len(ys) > 0.05 * img.shape[0] * img.shape[1], (key, colour, len(ys))  # a cell, not a sliver
        centre[key] = (ys.mean(), xs.mean())
    archs, augs = sorted(RESULTS), sorted(RESULTS["resnet18"])  # rows and columns, sorted by name
    for arch in archs:
        assert centre[(arch, augs[0])][1] < centre[(arch, augs[1])][1] - 50, centre
    for aug in augs:
        assert centre[(archs[0], aug)][0] < centre[(archs[1], aug)][0] - 50, centre


def test_means_plot_shows_each_ci_whole_where_it_reaches_past_the_seeds(tmp_path):
    """Two seeds far apart: the t-interval (±2.5) reaches past every seed and past 1; the axis holds it, drawn
    to the metric's bound, caps and all."""
    sweep = tmp_path / "sweep"
    for n, (arch, seed, acc) in enumerate([("resnet18", 1, 0.95), ("resnet18", 2, 0.97), ("vgg19", 1, 0.55),
                                           ("vgg19", 2, 0.90)]):
        _write_job(sweep / str(n), arch, "none", seed, acc)
    build_report([sweep])
    _check_means(sweep / "means.png", [0.96, 0.725])
    # a loss in [0, 1] has no ceiling: its CIs (0.275 ± 2.2, 0.60 ± 1.3) reach past 1, drawn whole (cut at 0)
    for n, loss in enumerate((0.50, 0.70, 0.45, 0.10)):
        run = json.loads((sweep / str(n) / "run.json").read_text())
        run["metrics"]["val/loss"] = loss
        (sweep / str(n) / "run.json").write_text(json.dumps(run))
    build_report([sweep], metric="val/loss")
    (mean, (top, bottom)), _ = _check_means(sweep / "means.png", [0.275, 0.60], higher_is_better=False)
    assert (bottom - mean) / (mean - top) < 0.2  # 0.275 above 0, 2.2 below 2.5 (cut at 1 it would be 0.38)


def test_report_cli_and_bad_path(sweep, tmp_path, capsys):
    from conftest import run_cli
    from visionsweep.report.__main__ import main

    proc = run_cli("report", str(sweep), "--metric", "test/acc")  # the real entry point, once
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model=vgg19 augmentation=none" in proc.stdout and (sweep / "report.html").is_file()
    for argv, words in (([str(tmp_path / "nowhere")], ["nowhere"]),
                        ([str(sweep), "--metric", "val/nope"], ["val/nope", "val/acc_best"])):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
        assert all(w in err for w in words), err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_report_html_renders_in_headless_chromium_with_the_csv_numbers(sweep, tmp_path):
    build_report([sweep])
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (sweep / "report.html").resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    summary = re.search(r"<table id=\"summary\">(.*?)</table>", dom.stdout, flags=re.S).group(1)
    shown = re.findall(r"<tr><td>(model=[^<]+)</td>(?:<td>[^<]*</td>){4}<td>([0-9.]+) ± ([0-9.]+)</td>", summary)
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [s[0] for s in shown] == [r["configuration"] for r in rows]
    for (_, mean, half), row in zip(shown, rows):
        assert float(mean) == pytest.approx(float(row["val/acc_best mean"]), abs=5e-5)
        assert float(half) == pytest.approx(float(row["val/acc_best ci95"]), abs=5e-5)
    assert dom.stdout.count("data:image/png;base64,") >= 3  # pictures embedded: no server, no network
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,2400", url],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as img:
        colours = img.convert("L").getextrema()
    assert colours[1] - colours[0] > 100  # something was drawn, not a blank page


def test_study_plots_are_optunas_and_name_the_importance_evaluator(tmp_path, monkeypatch):
    import optuna

    from visionsweep.report.study import describe, safe_stem, study_report

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = tmp_path / "optuna.db"
    study = optuna.create_study(study_name="s$x", storage=f"sqlite:///{db}", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr$", 1e-4, 1.0, log=True)
                   + (t.suggest_categorical("aug", ["none", "basic"]) == "basic"), n_trials=5)
    expected = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    calls, evaluate = [], optuna.importance.PedAnovaImportanceEvaluator.evaluate
    monkeypatch.setattr(optuna.importance.PedAnovaImportanceEvaluator, "evaluate",
                        lambda self, *a, **k: calls.append(1) or evaluate(self, *a, **k))
    result = study_report(db, tmp_path)
    assert len(calls) == 1  # the table and the plot share one PED-ANOVA computation
    [entry] = result["studies"]
    assert entry["importance"] == pytest.approx(expected) and entry["importance_evaluator"] == "PED-ANOVA"
    assert "importance (PED-ANOVA)" in describe(entry)
    stem = safe_stem("s$x")
    assert [p.name for p in result["images"]] == [f"optuna_history_{stem}.png", f"optuna_importance_{stem}.png"]
    history, importance = (_rgb(path) for path in result["images"])
    # the history: the trials' dots and the best-value line in colour on Optuna's grey axes
    assert (history.max(axis=2).astype(int) - history.min(axis=2) > 60).sum() > 200
    # the importance: one horizontal bar per parameter (2), in Optuna's bar colour
    bar = _near(importance, (49, 130, 189), 4)
    column = int(np.argmax(bar.sum(axis=0)))  # a column through every bar, just right of the axis
    assert len(_runs(bar[:, column])) == 2 == len(entry["importance"])


def test_paired_p_is_undefined_when_every_seed_differs_by_the_same_amount():
    from visionsweep.report.stats import paired

    same = paired({1: 0.9, 2: 0.8, 3: 0.7}, {1: 0.8, 2: 0.7, 3: 0.6}, "other")
    assert same.wins == 3 and math.isnan(same.p_value)
    varied = paired({1: 0.9, 2: 0.85, 3: 0.7}, {1: 0.8, 2: 0.7, 3: 0.65}, "other")
    assert 0 < varied.p_value < 1


def test_summary_csv_numbers_read_as_their_value_without_float_noise(tmp_path):
    """A mean of throughputs is 3320.3999999999996 in binary: the CSV says 3320.4 (12 significant digits, the
    value to 1e-12), flags read true/false and a label that starts like a formula is quoted."""
    import csv

    from visionsweep.report.render import write_csv

    noisy = sum([3320.1, 3320.7, 3320.4]) / 3  # the mean of three jobs' img/s
    assert str(noisy) != "3320.4"  # the noise this test is about
    path = write_csv([{"configuration": "=cmd", "throughput_img_s": noisy, "acc": 0.1 + 0.2, "pareto": True,
                       "seeds": 3, "best epoch": 1.5}], tmp_path / "summary.csv")
    row = next(csv.DictReader(path.open()))
    assert row == {"configuration": "'=cmd", "throughput_img_s": "3320.4", "acc": "0.3", "pareto": "true",
                   "seeds": "3", "best epoch": "1.5"}
    assert float(row["throughput_img_s"]) == pytest.approx(noisy, rel=1e-12)
