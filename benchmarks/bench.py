"""``make bench``: visionsweep's speed measured side by side with hand-written baselines, as ratios.

Every comparison runs in this one process on this machine, so the ratios (not the absolute numbers) are
what to compare across machines. Each prints one JSON line (``name``, ``ratio``, ``goal``, the raw
figures) and the lines are also written to ``--out`` (default ``runs/bench/<time>.jsonl``):

0. ``time_to_accuracy``: seconds of the default job (``python -m visionsweep.train``) until val/acc >= 0.99,
   and its fit time per epoch vs a hand-written loop on the same model, data and recipe (``ratio``: loop s
   / ours s per epoch), and ``ratio_epoch`` (goal >= 0.9): the same for a recurring epoch (the job's one-off
   set-up and final last.ckpt left out), each side measured next to the other in time, over 3 rounds (a
   drifting machine otherwise decides the ratio). In ``bench_accuracy.py``.
1. ``step_ratio``: framework train step rate (Trainer + ClassifierModule, metrics and logging on) vs a
   hand-written PyTorch loop; same timm model, same in-memory uint8 batches, same optimizer. Goal >= 0.95.
2. ``loader_ratio``: FolderDataModule loader img/s vs a raw cv2 + albumentations + DataLoader loop on
   the same generated JPEG folder (500x375), same transforms, workers and batch. Goal >= 1.0.
3. ``cache_memory_ratio`` / ``cache_disk_ratio``: cached loader (epochs after the first) vs uncached. Goal >= 3.
   Loaders (2., 3.) use batch 128 and are timed in interleaved passes; each side's median pass counts.
   ``cv2_jpeg_ratio``: the same loader without our OpenCV JPEG path (goal >= 1.3, or the part goes). In
   ``bench_earn.py``.
4. ``startup``: ``python -m visionsweep.train`` start -> first training step, seconds; ``ratio`` is that
   over a bare ``import torch, pytorch_lightning, timm, albumentations, hydra`` (what any run pays; wandb kept
   out of timm's import, as a job does).
6. ``sweep_joblib_ratio``: the same 4 small jobs (digits, ``threads=1``) as one sweep run sequentially vs
   ``hydra/launcher=joblib hydra.launcher.n_jobs=2``: wall-clock ratio of the two commands (goal >= 1.5 on
   2 cores) and ``identical``: whether every job's metrics match. Job size: ``--sweep-*`` flags.
7. ``ddp_ratio``: one training job (same model and data) as 1 process vs ``trainer=ddp trainer.devices=2``
   (2 gloo processes on CPU, 1 thread each; the single process gets both threads): wall-clock ratio, and
   each side's val/acc_best (not equal: a DDP step sees two shards of the batch). In ``bench_scaling.py``.
8. ``optuna_unbatched``: 6 Optuna trials of 1 or 4 epochs at ``hydra.sweeper.n_jobs=2`` (joblib), wall clock over
   the ideal (summed job times / 2) for ``hydra.sweeper.batched=true`` and for the default (a new trial as soon
   as one ends). Goal <= 1.2. In ``bench_optuna.py``.
5. GPU only (or ``--e2e-device cpu``): ``e2e_<model>``: end-to-end training img/s from the JPEG folder
   (data.cache=memory, workers = cores, bf16, channels_last) vs model-only img/s on device-resident
   batches, for resnet34 and vgg19 at 224 px. Goal >= 0.90 for resnet34 on H100-class hardware.

Defaults are sized for a small CPU (a few minutes); ``--full`` uses the issue's GPU sizes.
Examples: ``make bench``, ``make bench ARGS="--full"``, ``make bench ARGS="--skip startup,e2e"``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("step", "accuracy", "loader", "cache", "earn", "startup", "sweep", "ddp", "optuna", "e2e")


# ---------------------------------------------------------------------------- helpers
def emit(record: dict, out: Path | None) -> dict:
    """Print one JSON line (and append it to ``out``)."""
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")
    return record


def make_jpeg_folder(root: Path, n_images: int, size: tuple[int, int] = (500, 375), classes: int = 4) -> Path:
    """Write ``n_images`` JPEGs (``size`` = width x height) in ``classes`` folders, from sklearn's photos."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if root.is_dir() and sum(1 for _ in root.glob("*/*.jpg")) == n_images:
        return root
    rng = np.random.default_rng(0)
    w, h = size
    photos = []
    for src in load_sample_images().images:  # two 427 x 640 photos, ship with scikit-learn
        scale = max(h / src.shape[0], w / src.shape[1]) * 1.3  # room for random crops
        photos.append(np.asarray(Image.fromarray(src).resize((round(src.shape[1] * scale) + 1,
                                                              round(src.shape[0] * scale) + 1))))
    for i in range(n_images):
        big = photos[i % 2]
        y, x = rng.integers(0, big.shape[0] - h + 1), rng.integers(0, big.shape[1] - w + 1)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(big[y:y + h, x:x + w]).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def train_preset(image_size: int) -> dict:
    """The augmentation both loaders run: RandomResizedCrop + HorizontalFlip (a typical training preset)."""
    return {"name": "bench", "resize_first": False, "train": [
        {"_target_": "albumentations.RandomResizedCrop", "size": [image_size, image_size]},
        {"_target_": "albumentations.HorizontalFlip"}]}


def epoch_rates(loader, epochs: int = 2) -> list[float]:
    """img/s of each pass over ``loader``."""
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for x, _ in loader:
            n += len(x)
        rates.append(n / (time.perf_counter() - start))
    return rates


# ---------------------------------------------------------------------------- 1. step ratio
def _batches(n: int, batch: int, size: int, classes: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def hand_loop_rate(model_name: str, batches: list, warmup: int, device: str, precision: str,
                   channels_last: bool, compile: bool = False) -> float:
    """img/s of a minimal hand-written training loop (normalise on device, CE, AdamW; ``compile``: the
    network through ``torch.compile``, its compile time inside the warm-up steps)."""
    import timm
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = timm.create_model(model_name, num_classes=4, pretrained=False).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compile:
        net.compile()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    dtype = torch.bfloat16 if precision.startswith("bf16") else None
    net.train()
    start, images = 0.0, 0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = (x.float() - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        images += len(x) if i >= warmup else 0
    _sync(device)
    return images / (time.perf_counter() - start)


class Batches:
    """Ready-made batches as one iterable (Lightning would read a plain list as a list of loaders)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _trainer(device: str, precision: str, steps: int, monitor, **kw):
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                      max_steps=steps, max_epochs=kw.pop("max_epochs", 1), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=[monitor], **kw)


def framework_rate(model_name: str, batches: list, warmup: int, device: str, precision: str,
                   channels_last: bool, size: int) -> float:
    """img/s of visionsweep's ClassifierModule under the Lightning Trainer on the same batches."""
    import torch

    from visionsweep.callbacks.data_wait import DataWaitMonitor
    from visionsweep.models.classifier import ClassifierModule

    torch.manual_seed(0)
    model = ClassifierModule(model_name, num_classes=4, image_size=size, channels_last=channels_last,
                             optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-3}, scheduler=None)
    monitor = DataWaitMonitor(warmup_batches=warmup, filename=None, log_metrics=False, sync_cuda=True)
    _trainer(device, precision, len(batches), monitor).fit(model, train_dataloaders=Batches(batches))
    return float(monitor.epochs[-1]["img_s"])


def bench_step(a, out: Path | None) -> dict:
    batches = _batches(a.warmup + a.steps, a.batch_size, a.image_size, 4)
    cl = a.device == "cuda"
    fw, ref = [], []
    for _ in range(a.repeats):  # interleaved: background load hits both alike
        ref.append(hand_loop_rate(a.model, batches, a.warmup, a.device, a.precision, cl))
        fw.append(framework_rate(a.model, batches, a.warmup, a.device, a.precision, cl, a.image_size))
    return emit({"name": "step_ratio", "ratio": round(max(fw) / max(ref), 3), "goal": 0.95,
                 "framework_img_s": round(max(fw), 1), "reference_img_s": round(max(ref), 1),
                 "model": a.model, "image_size": a.image_size, "batch_size": a.batch_size,
                 "precision": a.precision, "device": a.device_name}, out)


# ---------------------------------------------------------------------------- 2./3. loaders
class RawDataset:
    """The hand-written baseline: cv2.imread + cvtColor + albumentations, uint8 CHW out."""

    def __init__(self, files: list, transform) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import cv2
        import torch

        path, label = self.files[i]
        img = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        img = self.transform(image=img)["image"]
        return torch.from_numpy(img.transpose(2, 0, 1).copy()), label


def _datamodule(root: Path, a, cache: str, cache_dir: Path | None = None):
    from visionsweep.augment import build_pipelines
    from visionsweep.data.folder import FolderDataModule

    train_tf, eval_tf = build_pipelines(train_preset(a.loader_size), a.loader_size, 0.95, "bilinear", seed=0)
    dm = FolderDataModule(str(root), image_size=a.loader_size, crop_pct=0.95, interpolation="bilinear",
                          val_fraction=0.1, batch_size=a.loader_batch_size, num_workers=a.workers,
                          persistent_workers=True, verify_images=False, cache=cache,
                          cache_dir=str(cache_dir) if cache_dir else None, decode_reduce=True,
                          train_transform=train_tf, eval_transform=eval_tf, prefetch_factor=4 if a.workers else None)
    dm.setup()
    return dm


def bench_loaders(a, root: Path, out: Path | None, loader: bool = True, cache: bool = True) -> list[dict]:
    """``loader_ratio`` and ``cache_{memory,disk}_ratio``: all loaders built first (persistent workers),
    then timed in interleaved passes, so a slow spell of the machine hits every loader alike; medians compared."""
    import albumentations as A
    from torch.utils.data import DataLoader

    dm = _datamodule(root, a, "none")
    tf = A.Compose([A.RandomResizedCrop(size=(a.loader_size, a.loader_size)), A.HorizontalFlip()], seed=0)
    loaders = {"raw": DataLoader(RawDataset(dm.train_samples, tf), batch_size=a.loader_batch_size, shuffle=True,
                                 num_workers=a.workers, persistent_workers=a.workers > 0),
               "none": dm.train_dataloader()}
    fill_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("memory", "disk") if cache else ():
            start = time.perf_counter()
            loaders[mode] = _datamodule(root, a, mode, Path(tmp)).train_dataloader()  # memory: decodes here
            epoch_rates(loaders[mode], 1)  # epoch 1: disk fills its entries
            fill_s[mode] = time.perf_counter() - start
        for name in ("raw", "none"):
            epoch_rates(loaders[name], 1)  # workers started, like training after epoch 1
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(a.loader_repeats):
            for name, dl in loaders.items():
                rates[name] += epoch_rates(dl, 1)
    best = {name: statistics.median(r) for name, r in rates.items()}  # one lucky pass must not decide
    common = {"images": len(dm.train_samples), "image_size": a.loader_size, "workers": a.workers,
              "batch_size": a.loader_batch_size, "device": "cpu (loader only)",
              "pass_img_s": {name: [round(r) for r in rs] for name, rs in rates.items()}}
    rows = []
    if loader:
        rows.append(emit({"name": "loader_ratio", "ratio": round(best["none"] / best["raw"], 3), "goal": 1.0,
                          "framework_img_s": round(best["none"], 1), "reference_img_s": round(best["raw"], 1),
                          **common}, out))
    for mode in fill_s:
        rows.append(emit({"name": f"cache_{mode}_ratio", "ratio": round(best[mode] / best["none"], 2), "goal": 3.0,
                          "cached_img_s": round(best[mode], 1), "uncached_img_s": round(best["none"], 1),
                          "fill_and_first_epoch_s": round(fill_s[mode], 2), **common}, out))
    return rows


# ---------------------------------------------------------------------------- 4. startup
def bench_startup(a, root: Path, out: Path | None) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.time()
    # the stack a job imports, and as a job imports it: timm without wandb (models.import_timm blocks it)
    subprocess.run([sys.executable, "-c", "import sys; sys.modules['wandb'] = None\n"
                    "import torch, pytorch_lightning, timm, albumentations, hydra"], check=True, env=env)
    imports = time.time() - start
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        args = [sys.executable, "-m", "visionsweep.train", "data=folder", f"data.root={root}", "model=resnet18",
                "data.image_size=64", "data.num_workers=0", "augmentation=none", "logger=csv", "test=false",
                "trainer.max_steps=1", "trainer.max_epochs=1", "trainer.limit_val_batches=0",
                "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
        start = time.time()
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"train failed: {proc.stderr[-2000:]}")
        first = json.loads((run_dir / "perf.json").read_text())["first_step_unix"]
    seconds = first - start
    return emit({"name": "startup", "ratio": round(seconds / imports, 2), "first_step_s": round(seconds, 2),
                 "bare_imports_s": round(imports, 2), "device": "cpu"}, out)


# ---------------------------------------------------------------------------- 5. end-to-end (GPU)
def model_only_rate(model_name: str, a, device: str, size: int, batch: int, compile: bool = False) -> float:
    return hand_loop_rate(model_name, _device_batches(a.e2e_warmup + a.e2e_steps, batch, size, device),
                          a.e2e_warmup, device, a.e2e_precision, device == "cuda", compile)


def _device_batches(n: int, batch: int, size: int, device: str) -> list:
    x, y = _batches(1, batch, size, 4)[0]
    x, y = x.to(device), y.to(device)
    return [(x, y)] * n  # already on the device: the model alone, no input pipeline at all


def e2e_rate(model_name: str, root: Path, a, device: str, size: int, batch: int, compile: bool = False) -> list[dict]:
    """Per-epoch stats of 2 epochs of the framework on the JPEG folder (the cache fills in epoch 1)."""
    import torch

    from visionsweep.callbacks.compile import CompileModel
    from visionsweep.augment import build_pipelines
    from visionsweep.callbacks.data_wait import DataWaitMonitor
    from visionsweep.data.folder import FolderDataModule
    from visionsweep.models.classifier import ClassifierModule

    train_tf, eval_tf = build_pipelines(train_preset(size), size, 0.95, "bilinear", seed=0)
    dm = FolderDataModule(str(root), image_size=size, crop_pct=0.95, val_fraction=0.05, batch_size=batch,
                          num_workers=a.e2e_workers, verify_images=False, cache=a.e2e_cache, decode_reduce=True,
                          cache_dir=str(root.parent / "cache"), prefetch_factor=4 if a.e2e_workers else None,
                          train_transform=train_tf, eval_transform=eval_tf)
    torch.manual_seed(0)
    model = ClassifierModule(model_name, num_classes=4, image_size=size, channels_last=device == "cuda",
                             optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-3}, scheduler=None)
    monitor = DataWaitMonitor(warmup_batches=a.e2e_warmup, filename=None, log_metrics=False)
    trainer = _trainer(device, a.e2e_precision, -1, monitor, max_epochs=2)
    if compile:
        trainer.callbacks.append(CompileModel(enabled=True))
    trainer.fit(model, datamodule=dm)
    return monitor.epochs  # epoch 2: workers warm, cache filled


def bench_e2e(a, out: Path | None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpeg_folder(Path(tmp) / "jpegs", a.e2e_images, a.jpeg_wh)
        variants = {"off": [False], "on": [True], "both": [False, True]}[a.e2e_compile]
        for name, compile in ((n, c) for n in a.e2e_models.split(",") for c in variants):
            batch = a.e2e_batch_size
            ref = model_only_rate(name, a, a.e2e_device, a.e2e_size, batch, compile)
            epochs = e2e_rate(name, root, a, a.e2e_device, a.e2e_size, batch, compile)
            stats = epochs[-1]
            rows.append(emit({"name": f"e2e_{name}" + ("_compile" if compile else ""),
                              "ratio": round(stats["img_s"] / ref, 3),
                              "goal": 0.90 if name == "resnet34" else None, "e2e_img_s": stats["img_s"],
                              "first_epoch_img_s": epochs[0]["img_s"], "compile": compile,
                              "model_only_img_s": round(ref, 1), "data_wait_frac": stats["data_wait_frac"],
                              "image_size": a.e2e_size, "batch_size": batch, "workers": a.e2e_workers,
                              "cache": a.e2e_cache, "precision": a.e2e_precision,
                              "device": _device_name(a.e2e_device)}, out))
    return rows


# ---------------------------------------------------------------------------- main
def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    from visionsweep.parallel import node_cores

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the issue's GPU sizes (resnet34 @224, batch 256, 2000 JPEGs)")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--out", default=None, help="JSON-lines file (default runs/bench/<time>.jsonl; '-' = none)")
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default=None, help="step_ratio model (default resnet18 on CPU, resnet34 on GPU)")
    p.add_argument("--image-size", type=int, default=None, help="step_ratio image side (64 CPU / 224 GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (32 CPU / 256 GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (15 CPU / 100 GPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best of each side counts")
    p.add_argument("--precision", default=None, help="32-true (CPU default) or bf16-mixed (GPU default)")
    p.add_argument("--n-images", type=int, default=None, help="JPEGs in the loader benchmark (1280 CPU / 2000 --full)")
    p.add_argument("--loader-size", type=int, default=224, help="crop side of the loader benchmark")
    p.add_argument("--loader-batch-size", type=int, default=128, help="loader benchmark batch (a GPU batch at 224 "
                   "px; small batches measure the DataLoader's per-batch inter-process cost more than the loader)")
    p.add_argument("--loader-repeats", type=int, default=5, help="interleaved timed passes per loader; the median counts")
    p.add_argument("--jpeg-size", default="500x375", help="generated JPEG size, WIDTHxHEIGHT")
    p.add_argument("--workers", type=int, default=node_cores(), help="DataLoader workers (default: cores)")
    p.add_argument("--e2e-device", default="cuda" if cuda else None, help="run the end-to-end section here "
                   "(default: cuda when available, else skipped; 'cpu' runs it on the CPU)")
    p.add_argument("--e2e-models", default="resnet34,vgg19", help="the README's GPU table: resnet34,resnet50,"
                   "vgg19,convnext_tiny,efficientnet_b0,vit_small_patch16_224 with --e2e-compile both")
    p.add_argument("--e2e-compile", default="off", choices=("off", "on", "both"),
                   help="torch.compile the network in both the model-only and the end-to-end run")
    p.add_argument("--sweep-model", default="resnet18", help="sweep section: model of the 4 jobs")
    p.add_argument("--sweep-size", type=int, default=32, help="sweep section: image side")
    p.add_argument("--sweep-epochs", type=int, default=2, help="sweep section: epochs per job")
    p.add_argument("--sweep-batches", type=int, default=45, help="sweep section: train batches per epoch (of 32)")
    p.add_argument("--e2e-size", type=int, default=224)
    p.add_argument("--e2e-batch-size", type=int, default=256)
    p.add_argument("--e2e-images", type=int, default=3000)
    p.add_argument("--e2e-steps", type=int, default=50)
    p.add_argument("--e2e-warmup", type=int, default=5)
    p.add_argument("--e2e-workers", type=int, default=node_cores())
    p.add_argument("--e2e-cache", default="memory", choices=("none", "memory", "disk"))
    p.add_argument("--e2e-precision", default=None)
    a = p.parse_args(argv)
    gpu = a.device == "cuda" or a.full
    a.model = a.model or ("resnet34" if gpu else "resnet18")
    a.image_size = a.image_size or (224 if gpu else 64)
    a.batch_size = a.batch_size or (256 if gpu else 32)
    a.steps = a.steps or (100 if gpu else 15)
    a.precision = a.precision or ("bf16-mixed" if a.device == "cuda" else "32-true")
    a.n_images = a.n_images or (2000 if a.full else 1280)
    a.e2e_precision = a.e2e_precision or ("bf16-mixed" if a.e2e_device == "cuda" else "32-true")
    a.device_name = _device_name(a.device)
    a.jpeg_wh = tuple(int(v) for v in a.jpeg_size.lower().split("x"))
    return a


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark sections; returns the JSON records (also printed)."""
    a = parse_args(argv)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if unknown := skip - set(SECTIONS):
        raise SystemExit(f"error: unknown --skip section(s) {sorted(unknown)}: choose from {', '.join(SECTIONS)}")
    if a.out == "-":
        out = None
    else:
        out = Path(a.out) if a.out else REPO / "runs" / "bench" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    if "step" not in skip:  # first line, always: the framework-vs-hand-written-loop ratio
        records.append(bench_step(a, out))
    if "accuracy" not in skip:
        from bench_accuracy import bench_time_to_accuracy  # beside this file

        records.append(bench_time_to_accuracy(a, out, emit, REPO))
    with tempfile.TemporaryDirectory() as tmp:
        need = {"loader", "cache", "earn", "startup"} - skip
        root = make_jpeg_folder(Path(tmp) / "jpegs", a.n_images, a.jpeg_wh) if need else None
        if "loader" not in skip or "cache" not in skip:
            records += bench_loaders(a, root, out, loader="loader" not in skip, cache="cache" not in skip)
        if "earn" not in skip:
            from bench_earn import bench_earn  # beside this file

            records += bench_earn(a, root, out, emit, _datamodule, epoch_rates)
        if "startup" not in skip:
            records.append(bench_startup(a, root, out))
    from bench_scaling import bench_ddp, bench_sweep  # beside this file

    if "sweep" not in skip:
        records.append(bench_sweep(a, out, emit, REPO))
    if "ddp" not in skip:
        records.append(bench_ddp(a, out, emit, REPO))
    if "optuna" not in skip:
        from bench_optuna import bench_optuna  # beside this file

        records.append(bench_optuna(a, out, emit, REPO))
    if "e2e" not in skip and a.e2e_device:
        records += bench_e2e(a, out)
    elif "e2e" not in skip:
        print('{"name": "e2e", "skipped": "no GPU (torch.cuda.is_available() is False); '
              '--e2e-device cpu runs it on the CPU"}', flush=True)
    if out is not None:
        print(f"# written to {out}", file=sys.stderr)
    return records


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
