"""Image classifier: any timm backbone in a LightningModule, normalising uint8 batches on the device."""

from __future__ import annotations

import inspect
import math
from typing import Any

import hydra.utils
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from visionsweep.models.backbones import create_backbone


class ClassifierModule(pl.LightningModule):
    """A timm backbone trained with cross-entropy; logs ``train/*``, ``val/*`` and ``test/*``.

    The checkpoint carries everything needed to use the model alone: class names, input size,
    mean/std, crop fraction and interpolation (all saved as hyper-parameters).

    Args:
        backbone: timm model name (``resnet34``, ``vgg19``, ``convnext_nano``...).
        num_classes: number of classes (filled from the data set by the training script).
        class_names: class names in label order.
        pretrained: start from timm's hub weights.
        pretrained_file: start from a local state-dict file.
        image_size: square input side.
        mean: per-channel mean in [0, 1], applied on the device.
        std: per-channel std, applied on the device.
        crop_pct: eval centre-crop fraction (recorded for predict/export).
        interpolation: resize interpolation (recorded for predict/export).
        drop_rate: dropout before the classifier.
        label_smoothing: cross-entropy label smoothing.
        optimizer: ``_target_``/``_partial_`` config of a ``torch.optim`` optimizer.
        scheduler: ``_target_``/``_partial_`` config of a ``torch.optim.lr_scheduler`` class, stepped
            every batch; its ``total_steps``/``T_max`` is filled from the trainer, or None.
        channels_last: run the backbone in channels-last memory format (faster on GPUs with AMP).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        class_names: list[str] | None = None,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        image_size: int = 224,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        crop_pct: float = 1.0,
        interpolation: str = "bilinear",
        drop_rate: float = 0.0,
        label_smoothing: float = 0.0,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.class_names = list(class_names or [str(i) for i in range(num_classes)])
        self.net = create_backbone(
            backbone, num_classes, pretrained=pretrained, pretrained_file=pretrained_file,
            image_size=image_size, drop_rate=drop_rate,
        )
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # uint8 in, normalised float out: x * scale + shift == (x / 255 - mean) / std
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

        metric = dict(num_classes=num_classes)
        self.train_acc = MulticlassAccuracy(average="micro", **metric)
        self.val_acc = MulticlassAccuracy(average="micro", **metric)
        self.test_acc = MulticlassAccuracy(average="micro", **metric)
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.test_f1 = MulticlassF1Score(average=None, **metric)
        self.test_precision = MulticlassPrecision(average=None, **metric)
        self.test_recall = MulticlassRecall(average=None, **metric)
        self.test_confusion = MulticlassConfusionMatrix(**metric)
        self.test_report: dict[str, Any] = {}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0..255) NCHW batch → normalised float, on whatever device ``x`` is."""
        x = x.float() * self.scale + self.shift
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a uint8 NCHW batch."""
        return self.net(self.normalize(x))

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        return loss, logits.argmax(dim=1), y

    def on_train_start(self) -> None:
        # the sanity check's val numbers must not count as a "best"
        self.val_loss.reset()
        self.val_acc.reset()
        self.val_acc_best.reset()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, preds, y = self._shared_step(batch)
        self.train_loss(loss)
        self.train_acc(preds, y)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, preds, y = self._shared_step(batch)
        self.val_loss(loss)
        self.val_acc(preds, y)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, preds, y = self._shared_step(batch)
        self.test_loss(loss)
        self.test_acc(preds, y)
        for m in (self.test_f1, self.test_precision, self.test_recall, self.test_confusion):
            m.update(preds, y)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        f1, prec, rec = (m.compute().tolist() for m in (self.test_f1, self.test_precision, self.test_recall))
        self.log("test/f1_macro", float(sum(f1) / len(f1)))
        self.test_report = {
            "per_class": {
                name: {"precision": p, "recall": r, "f1": f}
                for name, p, r, f in zip(self.class_names, prec, rec, f1)
            },
            "confusion_matrix": self.test_confusion.compute().tolist(),
        }
        for m in (self.test_f1, self.test_precision, self.test_recall, self.test_confusion):
            m.reset()

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(dim=1)

    def lr_scheduler_step(self, scheduler: Any, metric: Any = None) -> None:
        total = getattr(scheduler, "total_steps", None)
        if total is not None and scheduler.last_epoch + 1 >= total:
            # a resumed run given more epochs than its one-cycle was planned for: hold the final lr
            if not getattr(self, "_warned_cycle_end", False):
                self._warned_cycle_end = True
                rank_zero_warn("the one-cycle schedule has ended (resumed with more epochs than planned?): "
                               "the extra steps use its final learning rate")
            return
        scheduler.step() if metric is None else scheduler.step(metric)

    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.optimizer or {"_target_": "torch.optim.AdamW", "lr": 1e-3})
        opt_cfg["_partial_"] = True
        optimizer = hydra.utils.instantiate(opt_cfg)(params=self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        sched_cfg = dict(self.hparams.scheduler)
        sched_cfg["_partial_"] = True
        factory = hydra.utils.instantiate(sched_cfg)
        params = inspect.signature(factory.func).parameters
        steps = int(self.trainer.estimated_stepping_batches)
        if "pct_start" in params:  # OneCycleLR divides by its warm-up length: keep it ≥ 1 step
            pct = float(sched_cfg.get("pct_start", params["pct_start"].default))
            steps = max(steps, math.ceil(2 / pct) + 1)
        # one-cycle / cosine need the run's length, known only once the trainer has the data
        extra = {k: steps for k in ("total_steps", "T_max") if k in params and k not in sched_cfg}
        scheduler = factory(optimizer, **extra)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
