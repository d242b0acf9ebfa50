"""Disk policy of RunCheckpoint: best weights-only, one full last.ckpt, dropped by finished sweep jobs."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from visionsweep.callbacks.checkpoint import RunCheckpoint
from visionsweep.errors import ConfigError


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def _fit(tmp_path, epochs: int = 2, **kwargs) -> tuple[pl.Trainer, RunCheckpoint]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
    ckpt = RunCheckpoint(dirpath=tmp_path / "checkpoints", filename="epoch_{epoch:03d}", monitor="val/acc",
                         mode="max", save_last=True, auto_insert_metric_name=False, **kwargs)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny(), data, data)
    return trainer, ckpt


def test_best_is_weights_only_and_last_has_the_full_state(tmp_path):
    trainer, ckpt = _fit(tmp_path)
    best = torch.load(ckpt.best_model_path, weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in best and "state_dict" in best
    assert last["optimizer_states"] and "loops" in last
    # resuming twice into the same dir never makes a second "last"
    _fit(tmp_path, epochs=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("last*")) == ["last.ckpt"]


@pytest.mark.parametrize(("keep", "multirun", "kept"), [("auto", False, True), ("auto", True, False),
                                                        (True, True, True), (False, False, False)])
def test_finished_jobs_drop_last_by_policy(tmp_path, keep, multirun, kept):
    trainer, ckpt = _fit(tmp_path, keep_last=keep)
    ckpt.drop_last(trainer, multirun=multirun)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() == kept
    assert any((tmp_path / "checkpoints").glob("epoch_*.ckpt"))  # the best stays


def test_bad_keep_last_is_one_line():
    with pytest.raises(ConfigError, match="keep_last=maybe"):
        RunCheckpoint(keep_last="maybe")


@pytest.mark.parametrize(("every_s", "writes"), [(0, [0, 1, 2]), (3600, [2])])
def test_last_is_rewritten_at_most_every_last_every_s_and_always_at_the_end(tmp_path, monkeypatch, every_s, writes):
    epochs: list[int] = []
    save = RunCheckpoint._save_checkpoint

    def spy(self, trainer, filepath):
        if self._is_last(filepath):
            epochs.append(trainer.current_epoch)
        save(self, trainer, filepath)

    monkeypatch.setattr(RunCheckpoint, "_save_checkpoint", spy)
    _fit(tmp_path, epochs=3, last_every_s=every_s)
    assert epochs == writes
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["optimizer_states"]  # the final epoch's full state either way
