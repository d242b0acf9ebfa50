"""Nothing lost, nothing misleading: unreadable inputs to predict, and hostile class / file / override names
in the Markdown and CSV files we write (rendered with markdown-it, as a viewer would)."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from markdown_it import MarkdownIt
from PIL import Image

from conftest import FAST, compose_cfg, run_cli

IMG = "<img src=x onerror=alert(1)>"
PIPE = "a|b *c* [d](e)"
FORMULA = "@SUM(A1)"
HOSTILE = [IMG, PIPE, FORMULA]


def _render(md: str) -> str:
    return MarkdownIt("commonmark").enable("table").render(md)


def _cells(html_text: str) -> list[list[str]]:
    """Text of each table row's cells in rendered HTML (entities decoded)."""
    return [[html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", html_text, flags=re.S)]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    """A resnet10t (FAST) trained one epoch on 3 classes named like attacks; the first two hold identical images,
    so ``see=errors`` has confused pairs (naming them) whatever the model learns."""
    from visionsweep.train import train

    root = tmp_path_factory.mktemp("hostile") / "data"
    rng = np.random.default_rng(0)
    same = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(8)]
    for k, name in enumerate(HOSTILE):
        (root / name).mkdir(parents=True)
        for i in range(8):
            pixels = same[i] if k < 2 else np.full((32, 32, 3), 30 * i, np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    Image.fromarray(same[0]).save(root / FORMULA / "=1+2.png")
    out = tmp_path_factory.mktemp("hostile_run")
    train(compose_cfg(out, [*FAST, "data=folder", f"data.root={root}", "data.image_size=32", "data.batch_size=8",
                            "data.num_workers=0", "trainer.max_epochs=1", "test=false", "seed=0"]))
    return {"root": root, "ckpt": out / "checkpoints" / "last.ckpt"}


@pytest.fixture()
def with_garbage(hostile, tmp_path) -> Path:
    """Two readable images and one .png that is not an image."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("0.png", "1.png"):
        (folder / name).write_bytes((hostile["root"] / FORMULA / name).read_bytes())
    (folder / "garbage.png").write_bytes(b"not a png at all")
    return folder


def test_md_escape_renders_as_the_plain_text_and_keeps_one_table_row():
    from visionsweep.report.render import markdown_table
    from visionsweep.utils.text import md_escape

    names = [IMG, PIPE, "- item", "1. first", "1) first", "x\ny", "data.val_fraction", "_`#!{}~+&lt;\\",
             "[a](javascript:alert(1))", "![i](http://x/y.png)", "[r]: http://x", "(mean ± 95% CI)"]
    rendered = _render(markdown_table(["name", "n"], [[n, "1"] for n in names]))
    assert "<img" not in rendered and "<a " not in rendered and "<em>" not in rendered
    # header + one row per name, two cells each, and each cell reads exactly as the name
    assert _cells(rendered) == [["name", "n"]] + [[n.replace("\n", " "), "1"] for n in names]
    for name in ("1) first", "1. first", "- item", "+ x"):  # as a list item (the report's "left out" lines)
        item = _render(f"- {md_escape(name)}")
        assert item.count("<li>") == 1 and html.unescape(re.sub(r"<[^>]+>", "", item)).strip() == name, item
    # the raw file (what `make report` prints) keeps what needs no escape: no "\(" around a column's CI
    assert markdown_table(["val/acc_best (mean ± 95% CI)"], []).startswith("| val/acc_best (mean ± 95% CI) |")


def test_csv_cell_quotes_formulas_only():
    from visionsweep.utils.text import csv_cell

    assert [csv_cell(v) for v in ["=1+2", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "ok", 0.5, -3]] == \
        ["'=1+2", "'+1", "'-1", "'@SUM(A1)", "'\tx", "'\rx", "ok", 0.5, -3]


def test_bad_image_advice_names_the_commands_key(tmp_path):
    from visionsweep.data.images import BadImageError, bad_image_advice, load_rgb

    bad = tmp_path / "x.png"
    bad.write_bytes(b"junk")
    with pytest.raises(BadImageError, match=r"data\.skip_bad_images=true$"):
        load_rgb(bad)
    with bad_image_advice("remove it or set skip_bad_images=true"), pytest.raises(BadImageError) as err:
        load_rgb(bad)
    assert str(err.value).endswith(": remove it or set skip_bad_images=true") and "data." not in str(err.value)
    assert err.value.path == bad and err.value.reason.startswith("not an image")


def test_predict_stops_at_a_bad_image_naming_its_own_key(hostile, with_garbage, tmp_path):
    from visionsweep.data.images import BadImageError
    from visionsweep.predict import predict

    cfg = compose_cfg(tmp_path, [f"ckpt_path={hostile['ckpt']}", f"input={with_garbage}"], config_name="predict")
    with pytest.raises(BadImageError) as err:
        predict(cfg)
    assert str(err.value) == (f"cannot read image '{with_garbage / 'garbage.png'}' (not an image: Pillow cannot "
                              "identify the format): remove it or set skip_bad_images=true")
    assert not (tmp_path / "predictions.csv").exists()


@pytest.mark.scaling  # the same error through the CLI (one line, exit 2: the path test_checkpoints' predict CLI case takes)
def test_predict_cli_stops_at_a_bad_image_in_one_line_naming_its_key(hostile, with_garbage, tmp_path):
    res = run_cli("predict", f"ckpt_path={hostile['ckpt']}", f"input={with_garbage}",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last == (f"error: cannot read image '{with_garbage / 'garbage.png'}' (not an image: Pillow cannot "
                    "identify the format): remove it or set skip_bad_images=true")


def test_predict_skips_bad_images_and_lists_them(hostile, with_garbage, tmp_path, caplog):
    from visionsweep.predict import predict

    cfg = compose_cfg(tmp_path, [f"ckpt_path={hostile['ckpt']}", f"input={with_garbage}", "skip_bad_images=true"],
                      config_name="predict")
    with caplog.at_level("WARNING", logger="visionsweep.predict"):
        predict(cfg)
    assert [r.getMessage() for r in caplog.records] == \
        ["skip_bad_images: skipped 1 unreadable image(s) of 3 (rows with an error in predictions.csv)"]
    table = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [Path(r["path"]).name for r in table] == ["0.png", "1.png", "garbage.png"]
    assert all(r["predicted"] in HOSTILE or r["predicted"] == "'" + FORMULA for r in table[:2])
    assert [r["error"] for r in table] == ["", "", "not an image: Pillow cannot identify the format"]
    assert table[2]["predicted"] == table[2]["probability"] == ""
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["n_images"] == 2 and run["skipped"] == [
        {"path": str(with_garbage / "garbage.png"), "error": "not an image: Pillow cannot identify the format"}]


def test_predictions_csv_neutralises_formula_cells(hostile, tmp_path, monkeypatch):
    from visionsweep.predict import predict

    folder = hostile["root"] / FORMULA
    predict(compose_cfg(tmp_path, [f"ckpt_path={hostile['ckpt']}", f"input='{folder}'"], config_name="predict"))
    with (tmp_path / "predictions.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    formula = next(r for r in table if r["path"].endswith("=1+2.png"))
    assert formula["label"] == "'" + FORMULA and formula["path"] == str(folder / "=1+2.png")  # absolute: starts with /
    assert all(r["label"] == "'" + FORMULA for r in table)
    assert {r["predicted"] for r in table} <= {IMG, PIPE, "'" + FORMULA}
    assert 0 <= float(formula["probability"]) <= 1 and float(formula[f"prob_{FORMULA}"]) >= 0  # numbers stay numbers
    relative = tmp_path / "rel"
    (relative / "=x").mkdir(parents=True)  # a relative input: its path cells start with '='
    (relative / "=x" / "=1+2.png").write_bytes((folder / "=1+2.png").read_bytes())
    monkeypatch.chdir(relative)
    predict(compose_cfg(tmp_path / "out2", [f"ckpt_path={hostile['ckpt']}", "input='=x'"], config_name="predict"))
    with (tmp_path / "out2" / "predictions.csv").open(newline="") as fh:
        assert next(csv.DictReader(fh))["path"] == "'=x/=1+2.png"


def test_eval_and_see_name_their_own_fixes_for_a_bad_image(hostile, with_garbage, tmp_path):
    """Neither has a data.skip_bad_images that would act: eval reads the training run's data config, see's
    checkpoint modes read image= or that run's split."""
    from visionsweep.errors import DataError
    from visionsweep.eval import evaluate
    from visionsweep.see import see

    root = tmp_path / "root"
    shutil.copytree(hostile["root"], root)
    shutil.copy(with_garbage / "garbage.png", root / FORMULA / "garbage.png")
    cfg = compose_cfg(tmp_path / "eval", [f"ckpt_path={hostile['ckpt']}", f"data_root='{root}'"], config_name="eval")
    with pytest.raises(DataError) as err:
        evaluate(cfg)
    assert str(err.value) == (f"cannot read image '{root / FORMULA / 'garbage.png'}' (not an image: Pillow cannot "
                              "identify the format): restore or replace it, or evaluate another folder with "
                              "data_root=<folder>")
    cfg = compose_cfg(tmp_path / "see", ["see=features", f"ckpt_path={hostile['ckpt']}", f"image={with_garbage}"],
                      config_name="see")
    with pytest.raises(DataError, match=r"garbage\.png' .*: remove or replace it, or give another image= or data_root=$"):
        see(cfg)


def test_see_errors_index_md_escapes_class_names(hostile, tmp_path):
    from visionsweep.see import see

    see(compose_cfg(tmp_path, ["see=errors", f"ckpt_path={hostile['ckpt']}", "see.top_k=4"], config_name="see"))
    md = (tmp_path / "index.md").read_text()
    notes = md.split("## Notes\n\n", 1)[1].strip().splitlines()
    confused = [n for n in notes if n.startswith("- confused:")]
    assert confused and "<img" not in md and "<img" not in _render(md)
    index = json.loads((tmp_path / "index.json").read_text())
    shown = re.findall(r"<li>(.*?)</li>", _render(md))
    # every note is one list item that reads exactly as the note
    assert [html.unescape(s) for s in shown[-len(index["notes"]):]] == index["notes"]
    assert any(IMG in n for n in index["notes"])
    with (tmp_path / "per_class.csv").open(newline="") as fh:
        assert [r["class"] for r in csv.DictReader(fh)] == [IMG, "'" + FORMULA, PIPE]


def _job(job: Path, model: str, aug: str, seed: int, acc: float) -> None:
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"model={model}", f"augmentation={aug}", f"seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    (job / "run.json").write_text(json.dumps({"status": "ok", "seed": seed, "backbone": model, "augmentation": aug,
                                              "overrides": overrides, "metrics": {"val/acc_best": acc}}))


def test_report_summary_md_escapes_labels(tmp_path):
    from visionsweep.report import build_report

    sweep = tmp_path / "sweep"
    for n, (model, aug, seed, acc) in enumerate([(IMG, "none", 1, 0.9), (IMG, "none", 2, 0.8),
                                                 ("resnet18", PIPE, 1, 0.7), ("resnet18", PIPE, 2, 0.6)]):
        _job(sweep / str(n), model, aug, seed, acc)
    build_report([sweep], title="<b>*t*</b>")
    md = (sweep / "summary.md").read_text()
    rendered = _render(md)
    assert "<img" not in md and "<b>" not in rendered and "<em>" not in rendered
    assert re.findall(r"<img[^>]*>", rendered) == [f'<img src="{n}.png" alt="{n}" />' for n in ("means", "heatmap")]
    tables = re.findall(r"<table>.*?</table>", rendered, flags=re.S)
    summary = _cells(tables[0])
    assert len({len(r) for r in summary}) == 1 and len(summary) == 3  # header + 2 configurations, same width
    assert {r[0] for r in summary[1:]} == {f"model={IMG} augmentation=none", f"model=resnet18 augmentation={PIPE}"}
    assert {r[1] for r in summary[1:]} == {IMG, "resnet18"} and {r[2] for r in summary[1:]} == {"none", PIPE}
