"""`see=errors` (and Grad-CAM) on a multi-label checkpoint: a tiny model trained once on generated shapes with
awkward class names; the counts, galleries and files are checked against predictions recomputed here from
the checkpoint and the run's split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, compose_cfg

SIZE = 32
# '$...^$' fails to render if it reaches matplotlib's mathtext unescaped; '[', '<' and '/' are Markdown / HTML
NAMES = {"circle": "circle", "square": "sq[1]<b>/", "triangle": "$tri^$"}
EPS = 1e-5  # a probability this close to its threshold may fall either side with another batch size


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory) -> dict:
    """resnet10t trained 2 epochs on 120 generated multi-label images at 32 px, two classes renamed."""
    from visionsweep.data.builtin import write_shapes_multi
    from visionsweep.train import train

    tmp = tmp_path_factory.mktemp("see_multi")
    root = write_shapes_multi(tmp / "data", n_images=120, size=SIZE, seed=0)
    table = root / "labels.csv"
    rows = list(csv.DictReader(table.open(newline="")))
    truth = {r["path"]: {NAMES[n] for n in r["labels"].split()} for r in rows}
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "labels"])
        writer.writerows([p, " ".join(sorted(names))] for p, names in truth.items())
    out = tmp / "run"
    fast = [o for o in FAST if not o.startswith("data=")]  # task=multilabel picks data=shapes_multi
    metrics = train(compose_cfg(out, [*fast, "task=multilabel", f"data.root={root}", f"data.image_size={SIZE}",
                                      "data.batch_size=16", "trainer.max_epochs=2", "seed=1"]))
    run = json.loads((out / "run.json").read_text())
    return {"root": root, "run": out, "ckpt": run["best_checkpoint"], "metrics": metrics, "run_json": run,
            "truth": truth}


@pytest.fixture(scope="module")
def val_errors(multi_run, tmp_path_factory) -> dict:
    """see=errors on the run's val split, and the val predictions recomputed here."""
    out = tmp_path_factory.mktemp("see_multi_errors")
    result = _see(out, "see=errors", f"ckpt_path={multi_run['ckpt']}", "see.top_k=6")
    return {"out": out, "result": result, **_recompute(multi_run, "val")}


def _see(out: Path, *overrides: str) -> dict:
    from visionsweep.see import see

    return see(compose_cfg(out, list(overrides), config_name="see"))


def _recompute(multi_run: dict, split: str) -> dict:
    """Probabilities of the split's images (read with PIL, one batch), their true 0/1 labels (from the table
    written above) and the checkpoint's thresholds, all without the data module or the code under test."""
    import torch

    from visionsweep.checkpoints import load

    model = load(multi_run["ckpt"]).model.eval()
    with (multi_run["run"] / "splits" / f"{split}.csv").open(newline="") as fh:
        paths = [row["path"] for row in csv.DictReader(fh)]
    classes = list(model.class_names)
    images = np.stack([np.asarray(Image.open(multi_run["root"] / p).convert("RGB")) for p in paths])
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())).numpy()
    truth = np.array([[c in multi_run["truth"][p] for c in classes] for p in paths], dtype=bool)
    return {"paths": [str(multi_run["root"] / p) for p in paths], "classes": classes, "probs": probs,
            "truth": truth, "thresholds": model.thresholds.numpy().astype(np.float32)}


def _pngs_open(out: Path, result: dict) -> None:
    from visionsweep.analysis.plots import grid_size

    assert sorted(p.name for p in out.glob("*.png")) == sorted(f["file"] for f in result["files"])
    for f in result["files"]:
        with Image.open(out / f["file"]) as im:
            im.verify()
        with Image.open(out / f["file"]) as im:
            assert im.size == grid_size(f["rows"], f["cols"], f["panel"], f["dpi"], f["aspect"])
            assert np.asarray(im.convert("L")).std() > 5, f"{f['file']} looks blank"


@pytest.mark.usefixtures("one_thread")
def test_each_class_confusion_is_exact_at_the_checkpoints_thresholds(val_errors):
    res, probs, truth = val_errors["result"], val_errors["probs"], val_errors["truth"]
    thr = val_errors["thresholds"]
    n = len(val_errors["paths"])
    assert res["split"] == "val" and res["n_images"] == n and res["classes"] == val_errors["classes"]
    assert res["thresholds"] == pytest.approx(thr.tolist(), abs=1e-6)
    assert (thr != 0.5).any()   # tuned on val, not the untrained default
    decided = probs >= thr
    borderline = np.abs(probs - thr) < EPS
    for c, name in enumerate(val_errors["classes"]):
        row = res["per_class"][name]
        (tn, fp), (fn, tp) = row["confusion"]
        assert tn + fp + fn + tp == n
        p, t = decided[:, c], truth[:, c]
        expected = [int((~p & ~t).sum()), int((p & ~t).sum()), int((~p & t).sum()), int((p & t).sum())]
        slack = int(borderline[:, c].sum())
        assert np.abs(np.array([tn, fp, fn, tp]) - expected).max() <= slack, (name, row["confusion"], expected)
        assert row["support"] == int(t.sum()) == fn + tp
        assert row["threshold"] == pytest.approx(float(thr[c]), abs=1e-6)
        if tp + fp:
            assert row["precision"] == pytest.approx(tp / (tp + fp), abs=1e-6)
        if tp + fn:
            assert row["recall"] == pytest.approx(tp / (tp + fn), abs=1e-6)
        if 2 * tp + fp + fn:
            assert row["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-5)
    assert [f["file"] for f in res["files"]][:2] == ["confusion.png", "per_class.png"]
    confusion = res["files"][0]
    assert confusion["rows"] * confusion["cols"] >= len(val_errors["classes"])
    _pngs_open(val_errors["out"], res)


@pytest.mark.usefixtures("one_thread")
def test_per_class_csv_reads_back_and_the_index_is_strict_json(val_errors):
    out, res = val_errors["out"], val_errors["result"]
    with (out / "per_class.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class"] for r in rows] == val_errors["classes"] == sorted(NAMES.values())
    for r in rows:
        want = res["per_class"][r["class"]]
        for key in ("precision", "recall", "f1", "threshold"):
            assert float(r[key]) == pytest.approx(want[key], abs=1e-6), (r["class"], key)
        assert int(r["support"]) == want["support"]
        assert [[int(r["tn"]), int(r["fp"])], [int(r["fn"]), int(r["tp"])]] == want["confusion"]
        assert want["ap"] is None and r["ap"] == "nan" or float(r["ap"]) == pytest.approx(want["ap"], abs=1e-6)

    def no_nan(value: str) -> None:
        raise AssertionError(f"index.json holds {value}")

    index = json.loads((out / "index.json").read_text(), parse_constant=no_nan)
    assert index["per_class"] == res["per_class"] and index["false_positives"] == res["false_positives"]
    f1 = [res["per_class"][c]["f1"] for c in res["classes"]]
    assert res["f1_macro"] == pytest.approx(float(np.mean(f1)), abs=1e-5)
    # class names go to the PNGs and JSON only: index.md names files and generic titles
    md = (out / "index.md").read_text()
    assert not any(name in md for name in ("sq[1]", "<b>", "tri^"))


@pytest.mark.usefixtures("one_thread")
def test_gallery_false_positives_and_negatives_are_mistakes_of_their_class(val_errors):
    res, probs, truth, thr = (val_errors[k] for k in ("result", "probs", "truth", "thresholds"))
    classes, index_of = val_errors["classes"], {p: i for i, p in enumerate(val_errors["paths"])}
    fps, fns = res["false_positives"], res["false_negatives"]
    assert fps or fns   # two epochs on 72 images: a model that still errs
    for kind, shown, wrong in (("FP", fps, (probs >= thr) & ~truth), ("FN", fns, (probs < thr) & truth)):
        assert len(shown) <= 6
        for g in shown:
            i, c = index_of[g["file"]], classes.index(g["class"])
            assert g["prob"] == pytest.approx(float(probs[i, c]), abs=1e-3)
            assert g["true_labels"] == [classes[k] for k in np.flatnonzero(truth[i])]
            if kind == "FP":
                assert not truth[i, c] and probs[i, c] >= thr[c] - EPS, g
            else:
                assert truth[i, c] and probs[i, c] < thr[c] + EPS, g
        by_class: dict[str, list[float]] = {}
        for g in shown:
            by_class.setdefault(g["class"], []).append(g["prob"])
        assert list(by_class) == [c for c in classes if c in by_class]   # grouped in class order
        for name, shown_probs in by_class.items():
            c = classes.index(name)
            # the worst ones: the most probable negatives / least probable positives of the class
            candidates = np.sort(probs[wrong[:, c], c])
            worst = candidates[::-1] if kind == "FP" else candidates
            assert shown_probs == sorted(shown_probs, reverse=kind == "FP")
            assert shown_probs == pytest.approx(worst[:len(shown_probs)].tolist(), abs=2e-3)
        # every class with a clear mistake has one in the gallery when top_k leaves room for all of them
        clear = [c for c in range(len(classes)) if (wrong[:, c] & (np.abs(probs[:, c] - thr[c]) > EPS)).any()]
        if len(clear) <= 6:
            assert {classes[c] for c in clear} <= set(by_class)
        files = {f["file"] for f in res["files"]}
        assert (f"false_{'positives' if kind == 'FP' else 'negatives'}.png" in files) == bool(shown)


@pytest.mark.usefixtures("one_thread")
def test_test_split_equals_the_training_runs_test_report(multi_run, tmp_path):
    result = _see(tmp_path, "see=errors", f"ckpt_path={multi_run['ckpt']}", "split=test", "see.top_k=2")
    report = multi_run["run_json"]["test_report"]["per_class"]
    assert result["split"] == "test" and set(report) == set(result["classes"])
    for name, row in report.items():
        assert result["per_class"][name]["confusion"] == row["confusion"], name
        assert result["per_class"][name]["f1"] == pytest.approx(row["f1"], abs=1e-5)
        if np.isfinite(row["ap"]):
            assert result["per_class"][name]["ap"] == pytest.approx(row["ap"], abs=1e-5)
    assert result["f1_macro"] == pytest.approx(multi_run["metrics"]["test/f1_macro"], abs=1e-5)
    assert result["map"] == pytest.approx(multi_run["metrics"]["test/map"], abs=1e-5)
    assert len(result["false_positives"]) <= 2 and len(result["false_negatives"]) <= 2
    _pngs_open(tmp_path, result)


def test_worst_takes_the_classes_in_turn_and_confusions_count_every_image():
    from visionsweep.analysis.multierrors import confusions, worst

    probs = np.array([[0.9, 0.1], [0.8, 0.7], [0.7, 0.2], [0.2, 0.6], [0.6, 0.3]], dtype=np.float32)
    targets = np.array([[0, 1], [0, 0], [0, 1], [1, 1], [1, 0]])
    decided = probs >= np.array([0.5, 0.5])
    picked = worst(probs, targets, decided, k=3)
    # FP of class 0: images 0, 1, 2 (p .9 .8 .7); of class 1: image 1 (.7). In turn: 0, 1 (class 1), 1 (class 0)
    assert picked["fp"] == [(0, 0), (0, 1), (1, 1)]
    # FN of class 0: image 3 (.2; image 4 at .6 is found); of class 1: images 0 (.1), 2 (.2)
    assert picked["fn"] == [(0, 3), (1, 0), (1, 2)]
    cm = confusions(decided, targets)
    assert cm.shape == (2, 2, 2) and (cm.sum((1, 2)) == 5).all()
    assert cm[0].tolist() == [[0, 3], [1, 1]] and cm[1].tolist() == [[1, 1], [2, 1]]


@pytest.mark.usefixtures("one_thread")
def test_gradcam_for_a_chosen_class_on_given_images(multi_run, val_errors, tmp_path):
    # an image whose most probable class is not '$tri^$', which cam.py puts in a title unescaped (test below)
    top = val_errors["probs"].argmax(1)
    i = next(k for k, c in enumerate(top) if "$" not in val_errors["classes"][c])
    result = _see(tmp_path, "see=gradcam", f"ckpt_path={multi_run['ckpt']}", f"image={val_errors['paths'][i]}",
                  f"see.classes=[{NAMES['square']!r}]")
    assert (result["files"][0]["rows"], result["files"][0]["cols"]) == (1, 3)
    _pngs_open(tmp_path, result)


@pytest.mark.usefixtures("one_thread")
def test_gradcam_without_image_picks_val_images_of_a_multilabel_run(multi_run, tmp_path):
    result = _see(tmp_path, "see=gradcam", f"ckpt_path={multi_run['ckpt']}", "see.max_images=2")
    assert result["files"][0]["rows"] == 2


@pytest.mark.usefixtures("one_thread")
def test_gradcam_for_a_class_named_like_mathtext(multi_run, val_errors, tmp_path):
    result = _see(tmp_path, "see=gradcam", f"ckpt_path={multi_run['ckpt']}", f"image={val_errors['paths'][0]}",
                  f"see.classes=[{NAMES['triangle']!r}]")
    _pngs_open(tmp_path, result)
