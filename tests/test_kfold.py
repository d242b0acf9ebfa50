"""k-fold splits: stratified, seeded by data.split_seed, disjoint validation folds, one test split."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionsweep.data.splits import check_fold, kfold_split
from visionsweep.errors import ConfigError, DataError


def _per_class() -> dict[str, list[Path]]:
    return {c: [Path(c) / f"{i:03d}.png" for i in range(20 + 7 * k)] for k, c in enumerate("abc")}


def test_folds_are_disjoint_stratified_and_share_one_test_split():
    per_class, k = _per_class(), 4
    splits = [kfold_split(per_class, k, fold, test_fraction=0.1, seed=3) for fold in range(k)]
    tests = [frozenset(s["test"]) for s in splits]
    assert len(set(tests)) == 1 and len(tests[0]) > 0  # the same held-out images for every fold
    vals = [set(s["val"]) for s in splits]
    assert all(not (a & b) for i, a in enumerate(vals) for b in vals[i + 1:])  # disjoint
    everything = {(p, y) for y, c in enumerate(sorted(per_class)) for p in per_class[c]}
    assert set().union(*vals) | tests[0] == everything  # every non-test image validates once
    for s in splits:
        assert not set(s["train"]) & set(s["val"]) and not set(s["train"]) & set(s["test"])
        assert set(s["train"]) | set(s["val"]) | set(s["test"]) == everything
        for label, name in enumerate(sorted(per_class)):  # stratified: each class in each fold
            n_val = sum(y == label for _, y in s["val"])
            n_rest = len(per_class[name]) - sum(y == label for _, y in s["test"])
            assert abs(n_val - n_rest / k) <= 1


def test_folds_follow_the_split_seed_only():
    per_class = _per_class()
    assert kfold_split(per_class, 3, 1, 0.1, seed=0) == kfold_split(per_class, 3, 1, 0.1, seed=0)
    assert kfold_split(per_class, 3, 1, 0.1, seed=0)["val"] != kfold_split(per_class, 3, 1, 0.1, seed=1)["val"]


def test_bad_fold_settings_name_the_key():
    assert check_fold(None, None) is None and check_fold(0, 3) is None
    assert check_fold(5, 4) == (5, 4)
    with pytest.raises(ConfigError, match="data.fold=5 is outside 0..4"):
        check_fold(5, 5)
    with pytest.raises(ConfigError, match="data.folds=1"):
        check_fold(1, 0)
    with pytest.raises(DataError, match="class 'a' has 3 images .* data.folds=5"):
        kfold_split({"a": [Path(f"{i}") for i in range(3)], "b": [Path(f"b{i}") for i in range(9)]}, 5, 0, 0.0, 0)


@pytest.mark.scaling  # a 3-job sweep through the CLI
def test_three_fold_sweep_reports_one_row_over_disjoint_folds(digits_root, tmp_path):
    import csv

    from conftest import run_cli
    from test_sweeps import TINY, _jobs

    sweep = tmp_path / "kfold"
    proc = run_cli("train", "-m", "experiment=kfold", *TINY, f"data.root={digits_root}", "data.folds=3",
                   "data.fold=0,1,2", f"hydra.sweep.dir={sweep}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(sweep)
    assert len(jobs) == 3
    read = lambda job, split: {r["path"] for r in csv.DictReader((job / "splits" / f"{split}.csv").open())}  # noqa: E731
    vals = [read(j, "val") for j in jobs]
    assert all(vals) and not (vals[0] & vals[1]) and not (vals[0] & vals[2]) and not (vals[1] & vals[2])
    assert read(jobs[0], "test") == read(jobs[1], "test") == read(jobs[2], "test")
    assert run_cli("report", str(sweep)).returncode == 0
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 1 and rows[0]["folds"] == "3"
    assert "over folds" in (sweep / "summary.md").read_text()
