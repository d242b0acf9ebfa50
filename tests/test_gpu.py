"""GPU checks (``pytest -m gpu``, ``make gpu-check``): everything of the CPU suite that changes on a GPU.

bf16-mixed + channels_last, eager and ``torch.compile``, for classify and segment, held to the CPU
tests' learning bars; a resume after SIGKILL equal to the uninterrupted run; DDP over nccl; eval,
predict with TTA, the ONNX round trip and every ``see`` mode from a GPU-trained checkpoint; the pinned,
non-blocking loader with both caches; two jobs packed on one GPU through leases. Every run is tiny
(32 px, a few epochs, seconds of GPU time); most of each test's time is process start-up, so one
GPU-trained checkpoint (``cls_run``) serves the inference tests. Elsewhere the suite runs with
``CUDA_VISIBLE_DEVICES=""`` (conftest) and these tests are deselected, or skipped with the reason.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONF, FAST, REPO, compose_cfg, run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device (torch.cuda.is_available() is False)")]
N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
TWO_GPUS = pytest.mark.skipif(N_GPUS < 2, reason="no CUDA device (torch.cuda.is_available() is False)" if not N_GPUS
                              else f"DDP with nccl over 2 processes needs >= 2 GPUs (found {N_GPUS})")

GPU = ["trainer=gpu", "model.channels_last=true"]  # conf/trainer/gpu.yaml: bf16-mixed, cudnn.benchmark
DIGITS = ["data=digits", "augmentation=light", "trainer.max_epochs=2", "seed=1"]  # test_train.py's 0.8 bar
SEG = ["task=segment", "data.image_size=32", "data.batch_size=8", "augmentation=none", "logger=csv",  # test_segment.py
       "model.encoder_depth=3", "model.decoder_channels=[32,16,8]", "model.overlay_count=4",
       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
COMPILE = ["callbacks.compile.enabled=true"]


def _train(run: Path, *args: str, timeout: int = 300) -> tuple[dict, str]:
    """``python -m visionsweep.train`` into ``run``; returns its run.json and its console output."""
    proc = run_cli("train", *args, f"hydra.run.dir={run}", timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return json.loads((run / "run.json").read_text()), out


def _device_names() -> set[str]:
    return {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}


def _ran_on_the_gpu(run: Path, record: dict, out: str, precision: str = "bf16-mixed") -> None:
    """Lightning put the job on CUDA at ``precision``, and run.json / config.yaml say so."""
    assert record["status"] == "ok" and "GPU available: True (cuda), used: True" in out, out[-3000:]
    trainer = OmegaConf.load(run / "config.yaml").trainer
    assert trainer.accelerator == "gpu" and trainer.precision == precision
    if precision == "bf16-mixed":
        assert "Using bfloat16 Automatic Mixed Precision (AMP)" in out
    assert record["device"]["cuda"] and set(record["device"]["gpus"]) <= _device_names()
    gpu = record["gpu"]
    assert gpu["name"] in _device_names() and gpu["memory_gb"] > 1 and len(gpu["ids"]) == 1, gpu
    assert record["started"] < record["finished"]


def _best(record: dict) -> dict:
    ckpt = torch.load(record["best_checkpoint"], map_location="cpu", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])  # compiled or not: the same keys
    return ckpt


@pytest.fixture(autouse=True)
def _torch_flags():
    """In-process eval (deterministic=True) and the TF32 switches below are process-wide: restore them."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[2:]


def _no_tf32() -> None:
    """Plain fp32 on the GPU (Ampere+ convolutions default to TF32), for comparisons with the CPU."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, digits_root) -> tuple[Path, dict, str]:
    """resnet18 trained on the GPU (bf16-mixed, channels_last, eager) for 2 epochs on the digits at 32 px,
    decoded samples in memory; its checkpoint feeds eval, predict, export and see below."""
    run = tmp_path_factory.mktemp("gpu") / "cls"
    record, out = _train(run, *FAST, *GPU, *DIGITS, f"data.root={digits_root}", "data.cache=memory")
    return run, record, out


# ---------------------------------------------------------------------------------------- training
def test_classify_bf16_channels_last_learns(cls_run):
    run, record, out = cls_run
    _ran_on_the_gpu(run, record, out)
    assert record["metrics"]["val/acc_best"] >= 0.8 and record["metrics"]["test/acc"] >= 0.8, record["metrics"]
    assert "memory cache: 1439 images" in out
    ckpt = _best(record)
    weight = ckpt["state_dict"]["net.conv1.weight"]  # saved as trained: fp32 master weights, NHWC layout
    assert weight.dtype == torch.float32 and weight.is_contiguous(memory_format=torch.channels_last)
    assert ckpt["hyper_parameters"]["channels_last"] is True


def test_classify_compiled_with_pinned_workers_and_disk_cache(digits_root, tmp_path):
    """torch.compile under bf16 + channels_last, fed by 2 workers through pinned slots and the disk cache.
    22 full batches an epoch (1,439 images leave a ragged 23rd): the training graph compiles once."""
    record, out = _train(tmp_path / "run", *FAST, *GPU, *COMPILE, *DIGITS, f"data.root={digits_root}",
                         "trainer.limit_train_batches=22", "data.num_workers=2", "data.pin_memory=true",
                         "data.cache=disk", f"data.cache_dir={tmp_path / 'cache'}", timeout=600)
    _ran_on_the_gpu(tmp_path / "run", record, out)
    assert "torch.compile(ResNet)" in out
    assert record["metrics"]["val/acc_best"] >= 0.8 and record["metrics"]["test/acc"] >= 0.8, record["metrics"]
    assert len(list((tmp_path / "cache").rglob("*.u8"))) >= 1797  # every image, at the train and eval sides
    assert _best(record)["hyper_parameters"]["channels_last"] is True


def _all_background_miou(root: Path, split_csv: Path, n_classes: int) -> float:
    masks = [np.asarray(Image.open(root / row["mask"])) for row in csv.DictReader(split_csv.open())]
    return float(np.mean([(m == 0).mean() for m in masks])) / n_classes


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> tuple[Path, Path, dict, str]:
    """test_segment.py's run (12 epochs of 224 images at 32 px) on the GPU: bf16, channels_last, compiled
    (batches of 8 divide every split: no recompiles)."""
    from visionsweep.data.builtin import write_shapes_seg

    base = tmp_path_factory.mktemp("gpuseg")
    root = write_shapes_seg(base / "data", n_images=320, size=32, classes=("circle", "square"), max_shapes=2, seed=0)
    record, out = _train(base / "run", *SEG, *GPU, *COMPILE, f"data.root={root}", "trainer.max_epochs=12", "seed=1",
                         timeout=600)
    return root, base / "run", record, out


def test_segment_bf16_channels_last_compiled_learns(seg_run):
    root, run, record, out = seg_run
    _ran_on_the_gpu(run, record, out)
    assert "torch.compile(Unet)" in out
    baseline, metrics = _all_background_miou(root, run / "splits" / "val.csv", 3), record["metrics"]
    assert metrics["val/miou_best"] >= baseline + 0.2 and metrics["test/miou"] >= baseline + 0.1, (baseline, metrics)
    assert _best(record)["hyper_parameters"]["channels_last"] is True


def test_eval_of_the_gpu_segmenter_on_the_gpu(seg_run, tmp_path):
    """eval's own Trainer (fp32, deterministic="warn", accelerator=auto) on CUDA: cross-entropy over masks
    (nll_loss2d) has no deterministic CUDA kernel, so eval warns there instead of failing; bf16 in the training
    run's test vs fp32 here moves a few pixels only."""
    from visionsweep.eval import evaluate

    _, _, record, _ = seg_run
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = evaluate(compose_cfg(tmp_path, [f"ckpt_path={record['best_checkpoint']}"], config_name="eval"))
    assert torch.cuda.max_memory_allocated() > before  # accelerator=auto: it ran on the GPU
    assert result["test/miou"] == pytest.approx(record["metrics"]["test/miou"], abs=0.02)


# --------------------------------------------------------------------------------- kill and resume
def test_resume_after_sigkill_equals_the_uninterrupted_run(shapes_root, tmp_path):
    """test_faults.py's kill-and-resume on CUDA, bit for bit: fp32 (no autocast), deterministic kernels
    (torch.use_deterministic_algorithms, cuDNN without autotuning, cuBLAS with a fixed workspace). With
    trainer=gpu's bf16 + benchmark, runs differ in the last bits from the first step on: not a resume fault.
    The kill comes as soon as epoch 0's last.ckpt lands (an epoch takes milliseconds here)."""
    args = [*FAST, "trainer=gpu", "trainer.precision=32-true", "trainer.deterministic=true",
            "trainer.benchmark=false", "seed=7", "trainer.max_epochs=4", f"data.root={shapes_root}",
            "callbacks.model_checkpoint.last_every_s=0", "gpus.jobs_per_gpu=2"]  # 2 runs at once on one GPU
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}

    def start(run: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "visionsweep.train", *args, f"hydra.run.dir={run}", *extra],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(proc: subprocess.Popen) -> str:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        return out

    full, killed, resumed = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"
    uninterrupted, victim = start(full), start(killed)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    out = finish(uninterrupted)
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] < 3, "the kill came too late to test a resume"
    assert json.loads((killed / "run.json").read_text())["status"] == "running"  # it really died

    finish(start(resumed, f"ckpt_path={last}"))
    a, b = (json.loads((run / "run.json").read_text()) for run in (full, resumed))
    _ran_on_the_gpu(full, a, out, precision="32-true")
    assert b["resumed_from"] == str(last) and b["status"] == "ok"
    for key in ("val/acc", "val/loss", "test/acc", "val/acc_best"):
        assert b["metrics"][key] == a["metrics"][key], key

    def epochs(run: Path) -> dict[int, dict[str, str]]:
        rows: dict[int, dict[str, str]] = {}
        for r in csv.DictReader((run / "metrics.csv").open()):
            if r.get("epoch") and (r.get("val/loss") or r.get("train/loss")):
                rows.setdefault(int(r["epoch"]), {}).update(
                    {k: v for k, v in r.items() if k.split("/")[0] in ("val", "train") and v})
        return rows

    rows_a, rows_b = epochs(full), epochs(resumed)
    assert sorted(rows_b) == [e for e in sorted(rows_a) if e > saved["epoch"]]
    assert all(rows_b[e] == rows_a[e] for e in rows_b)
    wa, wb = (torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
              for run in (full, resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------------------------- DDP
def test_ddp_nccl_on_one_gpu_starts_the_process_group(shapes_root, tmp_path):
    """One rank: enough to show Lightning's DDP (our strategy) brings up nccl and trains through it."""
    run = tmp_path / "run"
    record, out = _train(run, *FAST, "trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=1",
                         "trainer.precision=bf16-mixed", "model.channels_last=true", f"data.root={shapes_root}",
                         "trainer.max_epochs=2", "seed=1")
    assert "distributed_backend=nccl" in out and "Starting with 1 processes" in out, out[-3000:]
    _ran_on_the_gpu(run, record, out)
    assert Path(record["best_checkpoint"]).is_file() and "val/acc" in record["metrics"]


@TWO_GPUS
def test_ddp_nccl_two_gpus_share_one_run_dir(digits_root, tmp_path):
    """test_distributed.py on 2 GPUs: one run dir, rank 0's files only; the global batch keeps the
    single-GPU learning bar."""
    run = tmp_path / "runs" / "ddp"
    proc = run_cli("train", *FAST, *DIGITS, "trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=2",
                   "trainer.precision=bf16-mixed", f"data.root={digits_root}", f"hydra.run.dir={run}",
                   f"paths.log_dir={tmp_path / 'runs'}", cwd=tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "distributed_backend=nccl" in out and "Starting with 2 processes" in out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"] and (run / "train_rank1.log").is_file()
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "ok" and len(record["gpu"]["ids"]) == 2, record.get("gpu")
    assert record["metrics"]["val/acc_best"] >= 0.8 and record["metrics"]["test/acc"] >= 0.8, record["metrics"]


# ------------------------------------------------------------- eval, predict, export, see (GPU ckpt)
def test_eval_on_the_gpu_reproduces_test_accuracy(cls_run, tmp_path):
    from visionsweep.eval import evaluate

    _, record, _ = cls_run
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = evaluate(compose_cfg(tmp_path, [f"ckpt_path={record['best_checkpoint']}"], config_name="eval"))
    assert torch.cuda.max_memory_allocated() > before  # accelerator=auto: it ran on the GPU
    # the run tested under bf16 autocast, eval in fp32: a borderline digit or two may flip (179 test images)
    assert result["test/acc"] == pytest.approx(record["metrics"]["test/acc"], abs=3 / 179)


def test_predict_with_tta_on_the_gpu_matches_the_cpu(cls_run, digits_root, tmp_path):
    from visionsweep import checkpoints
    from visionsweep.inference import CROPS, predict_images
    from visionsweep.predict import predict

    _, record, _ = cls_run
    _no_tf32()
    rows = predict(compose_cfg(tmp_path, [f"ckpt_path={record['best_checkpoint']}", f"input={digits_root}",
                                          "tta=true"], config_name="predict"))  # device: cuda when available
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["tta_views"] == ["eval", *CROPS] and run["tta_zoom"] == pytest.approx(1.1)  # light: no flips
    assert run["n_images"] == len(rows) == 1797 and run["accuracy"] >= 0.8
    model = checkpoints.load(record["best_checkpoint"], kind="classifier").model
    paths = [Path(r["path"]) for r in rows[:64]]
    on_cpu = predict_images(model, paths, tta=True, device="cpu", views=run["tta_views"], zoom=run["tta_zoom"])
    on_gpu = [[r[f"prob_{c}"] for c in model.class_names] for r in rows[:64]]
    assert np.abs(np.array(on_gpu) - on_cpu.numpy()).max() < 1e-4  # the CSV rounds to 6 decimals


def test_onnx_export_round_trip_of_the_gpu_checkpoint(cls_run, tmp_path):
    import onnxruntime as ort

    from visionsweep import checkpoints
    from visionsweep.export import export

    _, record, _ = cls_run
    info = export(compose_cfg(tmp_path, [f"ckpt_path={record['best_checkpoint']}", "format=onnx"],
                              config_name="export"))
    assert info["max_abs_diff"] <= 1e-4 and info["input"]["shape"] == ["N", 3, 32, 32]
    _no_tf32()
    model = checkpoints.load(record["best_checkpoint"], kind="classifier").model.cuda().eval()
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        ref = model(x.cuda()).float().cpu()
    got = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    assert np.abs(got - ref.numpy()).max() <= 1e-3  # CUDA fp32 vs the CPU runtime: summation order only


def test_every_see_mode_on_the_gpu_checkpoint(cls_run, digits_root, tmp_path):
    from visionsweep.see import modes, see

    _, record, _ = cls_run
    ckpt = [f"ckpt_path={record['best_checkpoint']}"]
    data = ["data=digits", f"data.root={digits_root}", "data.image_size=32", "model=resnet18"]
    extra = {"kernels": [], "augment": [*data, "see.samples=2", "see.variants=3"],
             "batch": [*data, "data.batch_size=8"], "features": [*ckpt, "see.top_k=4", "see.max_images=2"],
             "filters": ckpt, "occlusion": [*ckpt, "see.max_images=2"], "gradcam": [*ckpt, "see.max_images=2"],
             "errors": [*ckpt, "split=test", "see.top_k=4"]}
    assert set(extra) == set(modes()) == {p.stem for p in (CONF / "see").glob("*.yaml")}  # every mode
    for mode, args in extra.items():
        out = tmp_path / mode
        result = see(compose_cfg(out, [f"see={mode}", *args], config_name="see"))
        assert result["files"], mode
        for f in result["files"]:
            with Image.open(out / f["file"]) as im:
                assert im.size == (f["width"], f["height"]), (mode, f)
                assert np.asarray(im.convert("L")).std() > 5, f"{mode}: {f['file']} looks blank"


# ------------------------------------------------------------------------------------------ loader
@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_pinned_batches_copied_non_blocking_equal_the_plain_ones(shapes_root, tmp_path, cache):
    """2 workers' batches, pinned by the loader; Lightning moves them with non_blocking=True. On the device
    they equal what one process loads unpinned."""
    from pytorch_lightning.utilities import move_data_to_device

    from visionsweep.augment import build_pipelines
    from visionsweep.data.folder import FolderDataModule

    def module(workers: int, pin: bool) -> FolderDataModule:
        train_tf, eval_tf = build_pipelines({"name": "t", "train": [
            {"_target_": "albumentations.RandomResizedCrop", "size": [32, 32]}]}, 32, 1.0, "bilinear", seed=0)
        return FolderDataModule(str(shapes_root), image_size=32, crop_pct=1.0, interpolation="bilinear",
                                val_fraction=0.2, test_fraction=0.2, batch_size=16, num_workers=workers,
                                pin_memory=pin, cache=cache, cache_dir=str(tmp_path / "c"),
                                train_transform=train_tf, eval_transform=eval_tf)

    plain, pinned, cuda = module(0, False), module(2, True), torch.device("cuda")
    for split in ("train", "val"):
        loaders = [getattr(dm, f"{split}_dataloader")() for dm in (plain, pinned)]
        torch.manual_seed(0)  # the shuffle and the augmentation seeds of the epoch
        ref = list(loaders[0])
        torch.manual_seed(0)
        got = []
        for x, y in loaders[1]:
            assert x.is_pinned() and y.is_pinned() and x.dtype == torch.uint8
            got.append(move_data_to_device((x, y), cuda))
        torch.cuda.synchronize()
        assert len(got) == len(ref) > 1
        for (gx, gy), (rx, ry) in zip(got, ref):
            assert gx.device.type == "cuda" and torch.equal(gx.cpu(), rx) and torch.equal(gy.cpu(), ry)


# ------------------------------------------------------------------------------------------ leases
def test_two_jobs_share_one_gpu_through_leases(shapes_root, tmp_path):
    """A joblib sweep of 2 jobs, gpus.jobs_per_gpu=2 on a pool of one GPU: both lease it and run at once."""
    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
    sweep = tmp_path / "sweep"
    proc = run_cli("train", "-m", "seed=1,2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   f"gpus.pool=['{first}']", "gpus.jobs_per_gpu=2", f"gpus.lock_dir={tmp_path / 'locks'}",
                   *FAST, "trainer=gpu", f"data.root={shapes_root}", "trainer.max_epochs=3",
                   f"hydra.sweep.dir={sweep}", timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/run.json"))]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    for r in records:
        assert r["gpu"]["ids"] == [int(first) if first.isdigit() else first], r["gpu"]
        assert r["gpu"]["name"] in _device_names() and r["gpu"]["memory_gb"] > 1, r["gpu"]
    # packed: each job ran while the other held its lease
    assert max(r["started"] for r in records) < min(r["finished"] for r in records), \
        [(r["started"], r["finished"]) for r in records]
