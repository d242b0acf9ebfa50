"""Image classifier: any timm backbone in a LightningModule, normalising uint8 batches on the device."""

from __future__ import annotations

import re
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MultilabelAveragePrecision,
    MultilabelF1Score,
)

from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from visionsweep.errors import ConfigError
from visionsweep.models import calibration as cal
from visionsweep.models import multilabel as ml
from visionsweep.models.backbones import create_backbone
from visionsweep.models import PixelNormalize
from visionsweep.optim import Optimization


def _build_mixup(cfg: dict | None, label_smoothing: float, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix from ``model.mixup``; None when both alphas are 0 (or no config)."""
    if not cfg or not (float(cfg.get("mixup_alpha", 0) or 0) > 0 or float(cfg.get("cutmix_alpha", 0) or 0) > 0
                       or cfg.get("cutmix_minmax")):
        return None
    try:
        return Mixup(**cfg, label_smoothing=label_smoothing, num_classes=num_classes)
    except TypeError as e:
        raise ConfigError(f"model.mixup: {e} (keys of timm.data.Mixup: mixup_alpha, cutmix_alpha, "
                          "cutmix_minmax, prob, switch_prob, mode, correct_lam)") from None


PER_CLASS_LIMIT = 20  # per-class recall is logged as a metric up to this many classes (always in test_report)


def _metric_names(class_names: list[str]) -> list[str]:
    """Class names usable in a metric key (``val/recall/<name>``): other characters become ``_``; index
    names when that makes two alike."""
    names = [re.sub(r"[^A-Za-z0-9_.-]", "_", n)[:40] or str(i) for i, n in enumerate(class_names)]
    return names if len(set(names)) == len(names) else [str(i) for i in range(len(names))]


class ClassifierModule(pl.LightningModule):
    """A timm backbone trained with cross-entropy (or, multi-label, BCE); logs ``train/*``, ``val/*``, ``test/*``.

    Single-label metrics: ``val/acc`` (checkpoints and sweeps compare by it), ``val/f1_macro`` and
    ``val/acc_balanced`` (mean per-class recall), their ``test/*`` twins, per-class recall
    (``val/recall/<class>``, up to :data:`PER_CLASS_LIMIT` classes) and calibration (``val/ece``,
    ``val/nll``, ``val/brier`` at the ``temperature`` buffer, which temperature scaling sets). Multi-label
    (:mod:`visionsweep.models.multilabel`): ``val/map``, ``val/f1_macro``, ``val/f1_micro`` (at 0.5),
    and on test ``test/map`` and F1 at the per-class thresholds tuned on validation.

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
        mixup: keyword arguments of ``timm.data.Mixup`` (``mixup_alpha``, ``cutmix_alpha``, ``prob``,
            ``switch_prob``, ``mode``...); active when an alpha is > 0. Training then uses soft
            targets (label smoothing folded in) and ``SoftTargetCrossEntropy``.
        ema_decay: keep an exponential moving average of the weights (e.g. 0.999, with the warm-up of
            ``callbacks/ema.py``); validation, checkpoints and the final model use the averaged weights.
            None: off.
        weight_decay_norm_bias: also decay norm weights and biases (off: as timm and fastai do).
        multilabel: several labels per image (``task=multilabel``): targets are ``N x C`` 0/1, one sigmoid per class.
        loss: null (cross-entropy; multi-label: BCE), or ``asl`` (multi-label: timm's asymmetric loss).
        class_weights: per-class loss weights (``data.balance=weights``): cross-entropy's ``weight``, or
            BCE's ``pos_weight`` for multi-label.
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
        mixup: dict | None = None,
        ema_decay: float | None = None,
        weight_decay_norm_bias: bool = False,
        multilabel: bool = False,
        loss: str | None = None,
        class_weights: list[float] | None = None,
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
        self.pixels = PixelNormalize(mean, std, torch.channels_last if channels_last else torch.contiguous_format)

        self.multilabel = bool(multilabel)
        self.loss_kind = ml.check_loss(loss, self.multilabel)
        self.primary = "map" if self.multilabel else "acc"  # val/<primary>_best: what "best" means
        if class_weights is not None:  # not saved in the state: the hyper-parameters rebuild it
            self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32), persistent=False)
        else:
            self.class_weights = None
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()  # of val/<primary>
        # softmax(logits / T): 1 until temperature scaling (models/calibration.py) fits it; in the checkpoint
        self.register_buffer("temperature", torch.ones(()))
        self.test_report: dict[str, Any] = {}
        if self.multilabel:
            self.register_buffer("thresholds", torch.full((num_classes,), 0.5))  # tuned on val, kept in checkpoints
            labels = dict(num_labels=num_classes)
            self.train_f1 = MultilabelF1Score(average="micro", **labels)
            self.val_map = MultilabelAveragePrecision(average="macro", **labels)
            self.val_f1 = MultilabelF1Score(average="macro", **labels)
            self.val_f1_micro = MultilabelF1Score(average="micro", **labels)
            self._outputs: dict[str, list[torch.Tensor]] = {"val": [], "test": []}
        else:
            metric = dict(num_classes=num_classes)
            self.train_acc = MulticlassAccuracy(average="micro", **metric)
            self.val_acc = MulticlassAccuracy(average="micro", **metric)
            self.val_f1 = MulticlassF1Score(average="macro", **metric)
            self.val_acc_balanced = MulticlassAccuracy(average="macro", **metric)  # mean per-class recall
            self.val_recall = MulticlassRecall(average=None, **metric)
            self.recall_names = _metric_names(self.class_names) if num_classes <= PER_CLASS_LIMIT else []
            for split in ("val", "test"):  # calibration of softmax(logits / temperature)
                setattr(self, f"{split}_ece", MulticlassCalibrationError(n_bins=cal.N_BINS, **metric))
                setattr(self, f"{split}_nll", MeanMetric())
                setattr(self, f"{split}_brier", MeanMetric())
            self._confidence: list[torch.Tensor] = []  # test (top-class probability, correct) rows: reliability bins
            self.test_acc = MulticlassAccuracy(average="micro", **metric)
            self.test_acc_balanced = MulticlassAccuracy(average="macro", **metric)
            self.test_f1 = MulticlassF1Score(average=None, **metric)
            self.test_precision = MulticlassPrecision(average=None, **metric)
            self.test_recall = MulticlassRecall(average=None, **metric)
            self.test_confusion = MulticlassConfusionMatrix(**metric)
        self.weights_report: dict[str, Any] | None = getattr(self.net, "weights_report", None)
        self.optimization = Optimization(optimizer, scheduler, weight_decay_norm_bias)
        self.mixup = _build_mixup(mixup, label_smoothing, num_classes)
        if self.mixup is not None and self.multilabel:
            raise ConfigError("model.mixup works with single-label classes only: set model.mixup.mixup_alpha=0 "
                              "and model.mixup.cutmix_alpha=0 with task=multilabel")
        if ema_decay is not None and not 0.0 < float(ema_decay) < 1.0:
            raise ConfigError(f"model.ema_decay={ema_decay}: give a decay in (0, 1), e.g. 0.999, or null")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0..255) NCHW batch (any memory layout) → normalised float in the model's layout."""
        return self.pixels(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a uint8 NCHW batch."""
        return self.net(self.normalize(x))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of logits: ``softmax(logits / temperature)``, or one sigmoid per class for
        multi-label."""
        return logits.sigmoid() if self.multilabel else (logits / self.temperature).softmax(dim=1)

    def decide(self, probs: torch.Tensor) -> torch.Tensor:
        """Multi-label decisions (``N x C`` bool) at the tuned per-class thresholds."""
        return probs >= self.thresholds.to(probs.device)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0,
              weighted: bool = False) -> torch.Tensor:
        weight = self.class_weights if weighted else None
        if self.multilabel:
            return ml.multilabel_loss(self.loss_kind if weighted else "bce", logits, y, smoothing, weight)
        return F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        # val/test losses stay plain, unweighted (BCE or) cross-entropy: comparable across configs, as timm
        x, y = batch
        logits = self(x)
        return self._loss(logits, y), logits, y

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised, mixed-up/cut-mixed batch and its soft targets (timm's Mixup needs an even batch:
        an odd last sample is dropped)."""
        x = self.normalize(x)
        if len(x) % 2:
            x, y = x[:-1], y[:-1]
        return self.mixup(x, y)

    def on_train_start(self) -> None:
        # the sanity check's val numbers must not count as a "best"; a resumed run's best so far does
        self.val_loss.reset()
        for m in self._val_metrics().values():
            m.reset()
        self.val_acc_best.reset()
        restored = getattr(self, "_restored_acc_best", None)
        if restored is not None:
            self.val_acc_best.update(torch.tensor(restored, device=self.device))
            self._restored_acc_best = None

    def _best_key(self) -> str:
        return f"val_{self.primary}_best"  # val_acc_best (single-label), val_map_best (multi-label)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # torchmetrics states are not in the state_dict: keep the best val metric so far for a resume
        # (plain strings and floats: loadable weights-only)
        best = self.val_acc_best.max_value
        mark = checkpoint.setdefault("visionsweep", {})
        mark.setdefault("kind", "classifier")
        if self.val_acc_best.update_called and torch.isfinite(best):
            mark[self._best_key()] = float(best)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored_acc_best = (checkpoint.get("visionsweep") or {}).get(self._best_key())
        if isinstance(checkpoint.get("state_dict"), dict):  # a checkpoint from before temperature scaling: T = 1
            checkpoint["state_dict"].setdefault("temperature", torch.ones(()))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        smoothing = float(self.hparams.label_smoothing)
        if self.mixup is not None and len(x) > 1:
            x, soft = self.mix(x, y)
            logits = self.net(x)
            loss = SoftTargetCrossEntropy()(logits, soft)
            preds, y = logits.argmax(dim=1), soft.argmax(dim=1)  # accuracy against the dominant class
        else:
            logits = self(x)
            loss = self._loss(logits, y, smoothing, weighted=True)
            preds = logits.sigmoid() if self.multilabel else logits.argmax(dim=1)
        self.train_loss(loss)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        if self.multilabel:
            self.train_f1(preds, y.round().int())
            self.log("train/f1_micro", self.train_f1, on_step=False, on_epoch=True, prog_bar=True)
        else:
            self.train_acc(preds, y)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _val_metrics(self) -> dict[str, Any]:
        """``val/<name>`` → its metric (the first is the primary one, shown in the progress bar)."""
        if self.multilabel:
            return {"map": self.val_map, "f1_macro": self.val_f1, "f1_micro": self.val_f1_micro}
        return {"acc": self.val_acc, "f1_macro": self.val_f1, "acc_balanced": self.val_acc_balanced}

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._shared_step(batch)
        self.val_loss(loss)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        if self.multilabel:
            probs, target = logits.sigmoid(), y.round().int()
            self._outputs["val"].append(torch.cat([probs, y], dim=1).detach())
            preds = probs
        else:
            preds, target = logits.argmax(dim=1), y
        for i, (name, metric) in enumerate(self._val_metrics().items()):
            metric(preds, target)
            self.log(f"val/{name}", metric, on_step=False, on_epoch=True, prog_bar=i == 0)
        if not self.multilabel:
            self.val_recall.update(preds, target)
            self._calibration("val", logits, y)

    def _calibration(self, split: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Update and log ``<split>/ece``, ``/nll``, ``/brier`` of ``softmax(logits / T)``; returns the probabilities."""
        z = logits.float() / self.temperature
        probs = z.softmax(dim=1)
        ece, nll, brier = (getattr(self, f"{split}_{k}") for k in ("ece", "nll", "brier"))
        ece(probs, y)
        nll(F.cross_entropy(z, y, reduction="none"))
        brier(cal.brier(probs, y))
        for key, metric in (("ece", ece), ("nll", nll), ("brier", brier)):
            self.log(f"{split}/{key}", metric, on_step=False, on_epoch=True)
        return probs

    def on_validation_epoch_end(self) -> None:
        primary = self._val_metrics()[self.primary]
        self.val_acc_best(primary.compute())
        self.log(f"val/{self.primary}_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)
        if not self.multilabel:
            recall = self.val_recall.compute()
            self.val_recall.reset()
            for name, value in zip(self.recall_names, recall):
                self.log(f"val/recall/{name}", value)
        if self.multilabel:
            outputs = self._gathered("val")
            if outputs is not None and not self.trainer.sanity_checking:
                c = len(self.class_names)
                self.thresholds.copy_(ml.tune_thresholds(outputs[:, :c], outputs[:, c:]).to(self.thresholds))

    def _gathered(self, split: str) -> torch.Tensor | None:
        """This epoch's ``[probabilities | targets]`` rows of ``split`` from every process (then cleared)."""
        rows, self._outputs[split] = self._outputs[split], []
        if not rows:
            return None
        local = torch.cat(rows)
        if self.trainer.world_size > 1:  # the distributed sampler gives every rank as many rows
            local = self.all_gather(local).reshape(-1, local.shape[1])
        return local.float().cpu()

    def test_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._shared_step(batch)
        self.test_loss(loss)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        if self.multilabel:
            self._outputs["test"].append(torch.cat([logits.sigmoid(), y], dim=1).detach())
            return
        preds = logits.argmax(dim=1)
        probs = self._calibration("test", logits, y)
        self._confidence.append(torch.stack([probs.max(dim=1).values, (preds == y).float()], dim=1).detach().cpu())
        for m in (self.test_acc, self.test_acc_balanced):
            m(preds, y)
        for m in (self.test_f1, self.test_precision, self.test_recall, self.test_confusion):
            m.update(preds, y)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)
        self.log("test/acc_balanced", self.test_acc_balanced, on_step=False, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        if self.multilabel:
            outputs, c = self._gathered("test"), len(self.class_names)
            if outputs is not None:
                metrics, self.test_report = ml.final_scores(outputs[:, :c], outputs[:, c:], self.thresholds.cpu(),
                                                            self.class_names)
                for key, value in metrics.items():
                    self.log(key, value)
            return
        f1, prec, rec = (m.compute().tolist() for m in (self.test_f1, self.test_precision, self.test_recall))
        self.log("test/f1_macro", float(sum(f1) / len(f1)))
        for name, value in zip(self.recall_names, rec):
            self.log(f"test/recall/{name}", value)
        self.test_report = {
            "per_class": {
                name: {"precision": p, "recall": r, "f1": f}
                for name, p, r, f in zip(self.class_names, prec, rec, f1)
            },
            "confusion_matrix": self.test_confusion.compute().tolist(),
            "reliability": self._reliability(),
        }
        for m in (self.test_f1, self.test_precision, self.test_recall, self.test_confusion):
            m.reset()

    def _reliability(self) -> dict[str, Any] | None:
        """Reliability bins of this test pass (then cleared)."""
        rows, self._confidence = self._confidence, []
        if not rows:
            return None
        both = torch.cat(rows)
        return cal.reliability_bins(both[:, 0], both[:, 1])

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.probabilities(self(x))

    def lr_scheduler_step(self, scheduler: Any, metric: Any = None) -> None:
        self.optimization.step_scheduler(scheduler, metric)

    def configure_callbacks(self) -> list[pl.Callback]:
        if not self.hparams.get("ema_decay"):
            return []
        from visionsweep.callbacks.ema import EMA

        return [EMA(decay=float(self.hparams.ema_decay))]

    def configure_optimizers(self) -> Any:
        return self.optimization.configure(self.net, self.trainer)
