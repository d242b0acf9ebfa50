"""Speed plumbing: uint8 batches, device-side normalisation, input-bound diagnosis, compile, bench."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from tests.conftest import REPO, compose_cfg


def test_loader_yields_uint8_and_the_module_normalises_on_the_device(tmp_path, shapes_root):
    from visionsweep import builders

    cfg = compose_cfg(tmp_path, ["model=resnet18", "data=shapes", f"data.root={shapes_root}",
                                 "data.image_size=32", "augmentation=basic"])
    inp = builders.resolve_inputs(cfg)
    dm = builders.build_datamodule(cfg, inp, None)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)  # nothing turned it into float on the CPU
    model = builders.build_model(cfg, dm, inp)
    seen = {}
    model.net.register_forward_pre_hook(lambda m, args: seen.update(dtype=args[0].dtype))
    model(x)
    assert seen["dtype"] == torch.float32  # the cast happens inside the module (on its device)
    # resnet18's timm config: ImageNet mean/std
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    batch = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    want = (batch.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(batch), want)
    assert model.normalize(batch)[2, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


class _HWCSamples(Dataset):
    """Random uint8 images the way ImageFolderDataset returns them (CHW views of HWC arrays)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = [torch.randint(0, 256, (6, 5, 3), dtype=torch.uint8, generator=g) for _ in range(7)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from visionsweep.data.dataset import _to_chw_uint8

        return _to_chw_uint8(self.images[i].numpy(), Path(f"{i}.png")), i % 3


@pytest.mark.parametrize("workers", [0, 1])
def test_collate_builds_channels_last_uint8_batches_with_the_same_pixels(workers):
    from visionsweep.data.dataset import collate_images

    ds = _HWCSamples()
    batches = list(DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_images))
    x, y = batches[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (4, 3, 6, 5)
    assert x.is_contiguous(memory_format=torch.channels_last)  # N x H x W x C in memory
    want = torch.stack([img.permute(2, 0, 1) for img in ds.images])
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), want, rtol=0, atol=0)
    assert y.tolist() == [0, 1, 2, 0] and y.dtype == torch.int64
    # samples of different sizes: default_collate's error, naming the sizes
    with pytest.raises(RuntimeError, match="size"):
        collate_images([(torch.zeros(3, 4, 4, dtype=torch.uint8), 0), (torch.zeros(3, 5, 4, dtype=torch.uint8), 1)])


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_accepts_any_layout_and_returns_the_models(channels_last):
    from visionsweep.models.classifier import ClassifierModule

    model = ClassifierModule("resnet18", num_classes=2, image_size=8, channels_last=channels_last)
    x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # channels-last batch
    out = model.normalize(x)
    torch.testing.assert_close(out, model.normalize(x.contiguous()))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=fmt)


def test_normalisation_follows_the_backbone(tmp_path):
    from visionsweep.models.backbones import resolve_input_config
    from visionsweep.models.classifier import ClassifierModule

    inp = resolve_input_config("vit_tiny_patch16_224", image_size=32)
    assert inp.mean == (0.5, 0.5, 0.5) and inp.std == (0.5, 0.5, 0.5)  # not ImageNet's
    model = ClassifierModule("resnet10t", num_classes=2, image_size=32, mean=inp.mean, std=inp.std)
    out = model.normalize(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1))
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([-1.0, 1.0]))


class _Sleepy(Dataset):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int):
        time.sleep(self.delay)
        return torch.full((4,), float(i % 3)), i % 2


class _Tiny(pl.LightningModule):
    def __init__(self, step_delay: float = 0.0) -> None:
        super().__init__()
        self.layer, self.step_delay = torch.nn.Linear(4, 2), step_delay

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_delay)
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path: Path, load_delay: float, step_delay: float):
    from visionsweep.callbacks.data_wait import DataWaitMonitor

    monitor = DataWaitMonitor(threshold=0.2)
    trainer = pl.Trainer(max_epochs=1, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])
    trainer.fit(_Tiny(step_delay), DataLoader(_Sleepy(load_delay), batch_size=8))
    return monitor, trainer


def test_diagnosis_flags_a_slow_loader(tmp_path, caplog):
    before = time.time()
    monitor, trainer = _fit(tmp_path, load_delay=0.02, step_delay=0.0)  # 160 ms per batch vs a few ms of step
    after = time.time()
    stats = monitor.epochs[0]
    assert stats["input_bound"] == 1 and stats["data_wait_frac"] > 0.4, stats
    assert stats["images"] == 40  # 6 batches, the first left out as warm-up
    assert stats["loader_img_s"] < stats["step_img_s"]
    warning = [r.getMessage() for r in caplog.records if r.getMessage().startswith("input-bound")]
    assert len(warning) == 1 and "\n" not in warning[0]
    assert "data.num_workers" in warning[0] and "data.cache=memory" in warning[0] and "smaller images" in warning[0]
    assert trainer.callback_metrics["perf/input_bound"] == 1.0
    perf = json.loads((tmp_path / "perf.json").read_text())
    assert perf["input_bound"] is True and perf["epochs"][0]["warning"] == warning[0]
    assert before <= perf["first_step_unix"] <= after  # the wall-clock time of this fit's first step


def test_diagnosis_does_not_flag_a_fast_loader(tmp_path, caplog):
    # 100 ms steps: Lightning's own per-batch overhead (billed to the wait) stays far below 20% even on a slow,
    # loaded CI machine (with 20 ms steps a few ms of overhead there flagged it once)
    monitor, trainer = _fit(tmp_path, load_delay=0.0, step_delay=0.1)
    stats = monitor.epochs[0]
    assert stats["input_bound"] == 0 and stats["data_wait_frac"] < 0.2, stats
    assert stats["step_ms"] >= 100 and stats["img_s"] <= stats["step_img_s"]
    # the time from fit start to this epoch's end covers its 5 steps of >= 100 ms (what time_to_accuracy reads)
    assert stats["elapsed_s"] >= 5 * 0.1
    assert not [r for r in caplog.records if r.getMessage().startswith("input-bound")]
    assert trainer.callback_metrics["perf/input_bound"] == 0.0
    assert "perf/data_wait_frac" in trainer.callback_metrics


def test_compile_callback_compiles_in_place_and_keeps_checkpoint_keys(tmp_path):
    from visionsweep.callbacks.compile import CompileModel

    model = _Tiny()
    model.net = model.layer  # the callback compiles `net` when there is one
    keys = set(model.state_dict())
    cb = CompileModel(enabled=True, backend="eager")
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb])
    trainer.fit(model, DataLoader(_Sleepy(0.0), batch_size=8))
    assert cb.compiled is model.layer and model.layer._compiled_call_impl is not None
    assert set(model.state_dict()) == keys  # no "_orig_mod." prefix: checkpoints stay interchangeable
    assert CompileModel().enabled is False  # off unless asked for


def test_default_callbacks_include_data_wait_and_compile_only_when_enabled(tmp_path):
    from visionsweep import builders

    names = {type(cb).__name__ for cb in builders.build_callbacks(compose_cfg(tmp_path, []))}
    assert "DataWaitMonitor" in names and "CompileModel" not in names  # enabled: false is not even built
    cfg = compose_cfg(tmp_path, ["callbacks.compile.enabled=true"])
    compile_cb = [cb for cb in builders.build_callbacks(cfg) if type(cb).__name__ == "CompileModel"]
    assert len(compile_cb) == 1 and compile_cb[0].enabled is True


def test_a_config_yaml_from_before_the_rename_still_builds_its_callbacks(tmp_path):
    from visionsweep import builders

    cfg = compose_cfg(tmp_path, ["callbacks.throughput._target_=visionsweep.callbacks.throughput.ThroughputMonitor"])
    with pytest.warns(FutureWarning, match="DataWaitMonitor"):
        callbacks = builders.build_callbacks(cfg)
    assert any(type(cb).__name__ == "ThroughputMonitor" and cb.threshold == 0.2 for cb in callbacks)


def test_bench_writes_json_lines_with_ratios_step_ratio_first(tmp_path, monkeypatch):
    """Tiny sizes, CPU; the GPU-only end-to-end section forced onto the CPU. No timing is asserted."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench

    out = tmp_path / "bench.jsonl"
    records = bench.main(["--out", str(out), "--device", "cpu", "--skip", "accuracy,startup,sweep,ddp,optuna",
                          "--steps", "2", "--warmup", "1", "--repeats", "1", "--batch-size", "8", "--image-size", "32",
                          "--model", "resnet10t", "--n-images", "24", "--loader-size", "32", "--loader-batch-size", "8",
                          "--loader-repeats", "1", "--jpeg-size", "64x48", "--workers", "0",
                          "--e2e-device", "cpu", "--e2e-models", "resnet10t", "--e2e-size", "32",
                          "--e2e-images", "24", "--e2e-batch-size", "8", "--e2e-steps", "2", "--e2e-warmup", "1",
                          "--e2e-workers", "0"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == records
    assert [r["name"] for r in lines] == ["step_ratio", "loader_ratio", "cache_memory_ratio", "cache_disk_ratio",
                                          "cv2_jpeg_ratio", "e2e_resnet10t"]
    for r in lines:  # the earn line: ours against the loader without the part
        if r["name"] == "cv2_jpeg_ratio":
            r.update(framework_img_s=r["img_s"]["ours"], reference_img_s=r["img_s"]["pillow"])
    # each ratio is the quotient of the two rates its line records (rounded to 3 digits; the rates to 0.1)
    numerator_denominator = {"step_ratio": ("framework_img_s", "reference_img_s"),
                             "loader_ratio": ("framework_img_s", "reference_img_s"),
                             "cache_memory_ratio": ("cached_img_s", "uncached_img_s"),
                             "cache_disk_ratio": ("cached_img_s", "uncached_img_s"),
                             "cv2_jpeg_ratio": ("framework_img_s", "reference_img_s"),
                             "e2e_resnet10t": ("e2e_img_s", "model_only_img_s")}
    for r in lines:
        num, den = (r[k] for k in numerator_denominator[r["name"]])
        assert isinstance(r["ratio"], float) and num > 0 and den > 0, r
        assert r["ratio"] == pytest.approx(num / den, rel=0.02, abs=0.006), r
    assert sys.modules["bench"].SECTIONS  # the script is importable (make bench runs it as a file)
    assert callable(sys.modules["bench_scaling"].bench_ddp)  # its scaling lines too (whole sweeps: not here)
    import bench_optuna

    assert callable(bench_optuna.bench_optuna)
    import bench_accuracy

    assert callable(bench_accuracy.bench_time_to_accuracy)  # the default job's line: not here either
