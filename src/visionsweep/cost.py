"""What a trained model costs: size (parameters, multiply-adds), inference speed, peak memory (run.json ``cost``).

Time to a target metric is the report's (``report/cost.py``, from the per-epoch wall clock the job records).

Results are plain JSON-able ints/floats (ready for run.json). A model is any module taking ``N x 3 x S x S``
images, uint8 by default as ClassifierModule and SegmenterModule do. Measurements run in eval mode under
``torch.inference_mode()``; every submodule's train/eval flag is restored afterwards (frozen BN included).
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from os import PathLike
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger("visionsweep.cost")

MIB = 2 ** 20


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model without any)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode; each submodule's own ``training`` flag is put back on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in modes:
            m.training = flag


def _sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _images(n: int, size: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``n`` random 0..255 RGB images from a seeded generator, as ``dtype`` on ``device``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8).to(device=device, dtype=dtype)


def _percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100), interpolated linearly between ranks (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _ms(seconds: float) -> float:
    """Seconds as milliseconds to the microsecond."""
    return round(seconds * 1e3, 3)


def _time_calls(fn: Callable[[], Any], calls: int, warmup: int, budget_s: float,
                sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of each of ``calls`` timed calls of ``fn`` (``sync`` before each clock read).

    At least one untimed warm-up call is made (it estimates a call's time); further ones are skipped once
    warming up has used a quarter of ``budget_s``. When the timed calls would overrun ``budget_s`` they are
    fewer than ``calls``, never fewer than 5 (nor than ``calls`` if that is lower).
    """
    def timed() -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    start = time.perf_counter()
    for _ in range(max(1, warmup)):
        last = timed()
        if time.perf_counter() - start > budget_s / 4:
            break
    n = min(calls, max(5, int((budget_s - (time.perf_counter() - start)) / max(last, 1e-9))))
    return [timed() for _ in range(max(1, n))]


def model_size(model: nn.Module, image_size: int, dtype: torch.dtype = torch.uint8) -> dict[str, int]:
    """Parameter counts and the multiply-adds of one forward pass at batch 1.

    MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matrix products,
    attention; element-wise ops such as normalisation, activations and bias additions are not counted, as
    in the usual MAC tables) and halved: one multiply-add = 2 FLOPs.

    Args:
        model: The model (its input: ``1 x 3 x S x S`` zeros of ``dtype`` on the model's device).
        image_size: Input side ``S`` (the job's ``model.image_size``).
        dtype: Input dtype (uint8 for the visionsweep modules; float32 for a bare timm network).

    Returns:
        ``params`` (total), ``trainable_params``, ``macs``.
    """
    params = list(model.parameters())
    x = torch.zeros(1, 3, int(image_size), int(image_size), dtype=dtype, device=_device_of(model))
    with _eval_mode(model), torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return {"params": sum(p.numel() for p in params),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "macs": int(counter.get_total_flops()) // 2}


def inference_speed(model: nn.Module, image_size: int, device: str | torch.device | None = None, batch: int = 32,
                    calls: int = 30, warmup: int = 3, budget_s: float = 10.0,
                    dtype: torch.dtype = torch.uint8) -> dict[str, Any]:
    """Latency at batch 1 and throughput at ``batch``, in eval mode under ``torch.inference_mode()``.

    Each figure is the median of timed calls made after ``warmup`` untimed ones; on CUDA the device is
    synchronised around every timed call. Half of ``budget_s`` goes to each figure: a slow model gets
    fewer timed calls (never fewer than 5), counted in ``latency_calls`` / ``throughput_calls``.

    Args:
        model: The model (takes random ``N x 3 x S x S`` images of ``dtype``, seeded).
        image_size: Input side ``S``.
        device: Where to measure (None: the model's device; another one: the model is moved there and back).
        batch: Batch size of the throughput calls (0: no throughput).
        calls: Timed calls wanted per figure (``warmup`` untimed ones first).
        warmup: Untimed calls per figure.
        budget_s: Rough total time for the measurement.
        dtype: Input dtype (uint8 for the visionsweep modules).

    Returns:
        ``latency_ms`` (median, batch 1), ``latency_ms_p90``, ``latency_calls``, ``throughput_img_s``
        (``batch`` / median call time; None when ``batch`` is 0 or ran out of device memory),
        ``throughput_batch``, ``throughput_calls``, ``device``.
    """
    home = _device_of(model)
    dev = torch.device(device) if device is not None else home
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    sync = (lambda: _sync(dev))
    out: dict[str, Any] = {"device": str(dev)}
    if dev != home:
        model.to(dev)
    try:
        with _eval_mode(model), torch.inference_mode():
            x1 = _images(1, image_size, dtype, dev)
            times = _time_calls(lambda: model(x1), calls, warmup, budget_s / 2, sync)
            out.update(latency_ms=_ms(statistics.median(times)), latency_ms_p90=_ms(_percentile(times, 90)),
                       latency_calls=len(times), throughput_img_s=None, throughput_batch=int(batch),
                       throughput_calls=0)
            if batch > 0:
                try:
                    xb = _images(int(batch), image_size, dtype, dev, seed=1)
                    times = _time_calls(lambda: model(xb), calls, warmup, budget_s / 2, sync)
                    out.update(throughput_img_s=round(batch / statistics.median(times), 2),
                               throughput_calls=len(times))
                except torch.OutOfMemoryError:
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
    finally:
        if dev != home:
            model.to(home)
    return out


def peak_memory(device: str | torch.device | None = None) -> dict[str, Any]:
    """The process's peak memory so far, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, since the start or the last
    ``torch.cuda.reset_peak_memory_stats``); measure it before :func:`inference_speed`, whose batch may
    raise it. CPU (or anything else): the peak resident set size of the whole process.

    Args:
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``... (None: the CPU).

    Returns:
        ``peak_mem_mb``, ``peak_mem_kind`` (``"cuda_allocated"`` or ``"cpu_rss"``).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return {"peak_mem_mb": round(torch.cuda.max_memory_allocated(dev) / MIB, 1), "peak_mem_kind": "cuda_allocated"}
    import resource  # (POSIX only)

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB on Linux
    return {"peak_mem_mb": round(rss / (MIB if sys.platform == "darwin" else 1024), 1), "peak_mem_kind": "cpu_rss"}


def onnx_speed(onnx_path: str | PathLike, image_size: int, batch: int = 1, calls: int = 30, warmup: int = 3,
               budget_s: float = 10.0, threads: int | None = None) -> dict[str, Any]:
    """Latency of an exported ONNX model through onnxruntime's CPU provider.

    The input matches the file's: uint8 or float32 (0..255 values, as :mod:`visionsweep.export` writes
    them, normalisation inside), ``N x 3 x S x S``; a file with a fixed batch dimension is timed at that
    batch.

    Args:
        onnx_path: The ``.onnx`` file.
        image_size: Input side ``S``.
        batch: Images per call (random, seeded).
        calls, warmup, budget_s: As for :func:`inference_speed` (fewer calls when slow, never fewer than 5).
        threads: onnxruntime's intra-op threads (None: its default, all cores).

    Returns:
        ``onnx_latency_ms`` (median call), ``onnx_latency_ms_p90``, ``onnx_calls``, ``onnx_batch``,
        ``onnx_throughput_img_s``.
    """
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        raise ImportError("onnx_speed needs onnxruntime: pip install onnxruntime") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtypes = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}
    if inp.type not in dtypes:
        raise ValueError(f"{onnx_path}: input {inp.name!r} is {inp.type}; expected uint8 or float32 images")
    shape = list(inp.shape)
    n = shape[0] if isinstance(shape[0], int) else int(batch)
    want = [n, 3, int(image_size), int(image_size)]
    if len(shape) != 4 or any(isinstance(d, int) and d != w for d, w in zip(shape, want)):
        raise ValueError(f"{onnx_path}: input shape {shape} does not take {want} (image_size={image_size}?)")
    x = _images(n, image_size, torch.uint8, torch.device("cpu")).numpy().astype(dtypes[inp.type])
    times = _time_calls(lambda: sess.run(None, {inp.name: x}), calls, warmup, budget_s)
    med = statistics.median(times)
    return {"onnx_latency_ms": _ms(med), "onnx_latency_ms_p90": _ms(_percentile(times, 90)),
            "onnx_calls": len(times), "onnx_batch": n, "onnx_throughput_img_s": round(n / med, 2)}


def onnx_cost(path: str | PathLike, image_size: int) -> dict[str, Any]:
    """``{"cost": onnx_speed(...)}`` of an exported file at batch 1, or ``{}`` with a warning when it cannot be
    timed (onnxruntime missing or refusing the graph: a number lost, not the export)."""
    try:
        cost = onnx_speed(path, image_size, batch=1)
    except Exception as e:  # noqa: BLE001
        log.warning("the ONNX file was not timed (%s: %s)", type(e).__name__, (str(e).splitlines() or [""])[0])
        return {}
    log.info("onnxruntime: %.2f ms per image at batch 1 (median of %d calls, cpu)", cost["onnx_latency_ms"],
             cost["onnx_calls"])
    return {"cost": cost}


def job_cost(model: nn.Module, image_size: int, device: torch.device, fit_s: float, train_img_s: float | None,
             devices: int = 1, batch: int = 32, calls: int = 30, budget_s: float = 10.0,
             onnx: bool = False, opset: int = 18) -> dict[str, Any]:
    """run.json's ``cost`` of a finished job: size, peak memory, inference speed, training time.

    Peak memory is read first (an inference batch may raise it); inference is timed on the run's device
    from the model as it stands (the best checkpoint's weights after testing).

    Args:
        model: the trained module (uint8 input).
        image_size: its input side.
        device: the device it trained on.
        fit_s: seconds ``trainer.fit`` took.
        train_img_s: training images per second (run.json's ``train_images_per_s``).
        devices: devices the fit used (device-hours = ``fit_s * devices / 3600``).
        batch: throughput batch size.
        calls, budget_s: timed calls per figure and the rough time budget (see :func:`inference_speed`).
        onnx: also export the model to ONNX (a temporary file) and time it through onnxruntime.
        opset: ONNX opset of that export.

    Returns:
        ``params``, ``trainable_params``, ``macs``, ``image_size``, ``peak_mem_mb``, ``peak_mem_kind``,
        ``latency_ms`` (median at batch 1), ``latency_ms_p90``, ``latency_calls``, ``throughput_img_s``,
        ``throughput_batch``, ``throughput_calls``, ``device``, ``train_s``, ``train_img_s``,
        ``device_hours`` (and ``onnx_latency_ms``... with ``onnx``).
    """
    out: dict[str, Any] = {**model_size(model, image_size), "image_size": int(image_size), **peak_memory(device)}
    out.update(inference_speed(model, image_size, device, batch=batch, calls=calls, budget_s=budget_s))
    out.update(train_s=round(fit_s, 3), train_img_s=train_img_s, device_hours=round(fit_s * max(1, devices) / 3600, 6))
    if onnx:
        import tempfile
        from pathlib import Path

        from visionsweep.models.deploy import Deployable, random_images, to_onnx

        with tempfile.TemporaryDirectory(prefix="visionsweep-cost-") as tmp:
            path = Path(tmp) / "model.onnx"
            home = _device_of(model)
            try:
                to_onnx(Deployable(model.cpu()).eval(), random_images(1, image_size, "uint8"), path, opset)
            finally:
                model.to(home)
            out.update(onnx_speed(path, image_size, calls=calls, budget_s=budget_s / 2))
    return out


def loggable(cost: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``cost`` record as ``cost/<key>`` metrics for the loggers."""
    return {f"cost/{k}": float(v) for k, v in cost.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_calls")}
