"""fastai's ``vision_learner`` + ``fit_one_cycle`` on visionsweep's digits split: the reference of ``vs_fastai.py``.

Runs in a venv that has fastai (``make bench-fastai`` makes ``.venv-fastai``); reads the split CSVs a
visionsweep run wrote (``<run>/splits/{train,val,test}.csv``) so both systems see the same images.
Prints one JSON line: fit seconds, per-epoch val acc, final val and test acc.

    .venv-fastai/bin/python benchmarks/fastai_digits.py --root data/digits --splits runs/train/<run>/splits
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch
from fastai.vision.all import (ImageDataLoaders, Resize, accuracy, resnet34, set_seed,
                               vision_learner)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True, help="the class folders (data.root)")
    p.add_argument("--splits", type=Path, required=True, help="folder with train.csv, val.csv, test.csv")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    set_seed(a.seed, reproducible=True)
    read = lambda s: pd.read_csv(a.splits / f"{s}.csv", dtype={"class": str})  # noqa: E731
    df = pd.concat([read("train").assign(is_valid=False), read("val").assign(is_valid=True)])
    dls = ImageDataLoaders.from_df(df, path=a.root, fn_col="path", label_col="class", valid_col="is_valid",
                                   item_tfms=Resize(a.size), bs=a.bs, num_workers=0)
    learn = vision_learner(dls, resnet34, pretrained=False, metrics=accuracy)
    start = time.perf_counter()
    with learn.no_bar():
        learn.fit_one_cycle(a.epochs, a.lr)
        fit_s = time.perf_counter() - start
        val_acc = [float(v[2]) for v in learn.recorder.values]  # (train loss, val loss, accuracy) per epoch
        probs, targets = learn.get_preds(dl=learn.dls.test_dl(read("test"), with_labels=True))  # resets values
    test_acc = float((probs.argmax(1) == targets).float().mean())
    print(json.dumps({"system": "fastai", "fit_s": round(fit_s, 2), "val_acc_per_epoch": val_acc,
                      "val_acc": val_acc[-1], "val_acc_best": max(val_acc), "test_acc": test_acc,
                      "seed": a.seed, "epochs": a.epochs}), flush=True)


if __name__ == "__main__":
    main()
