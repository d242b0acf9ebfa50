"""Semantic segmentation: segmentation_models_pytorch decoders (U-Net, FPN, ...) on any timm encoder.

Input batches are uint8 and normalised on the device, like the classifier. Sizes not divisible by the
encoder's stride are padded inside :meth:`SegmenterModule.forward` and the logits cropped back, so any
image size goes in and a same-size prediction comes out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import segmentation_models_pytorch as smp
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from visionsweep.errors import ConfigError
from visionsweep.models.backbones import check_backbone, hub_reachable
from visionsweep.models import PixelNormalize
from visionsweep.optim import Optimization
from visionsweep.utils.atomic import atomic_open, save_figure

log = logging.getLogger(__name__)
LOSSES = ("ce", "dice", "dice_ce")


def scores(confusion: torch.Tensor) -> dict[str, Any]:
    """Per-class IoU and Dice, their means over the classes that occur, and pixel accuracy.

    Args:
        confusion: ``C x C`` confusion matrix (rows: truth, columns: prediction).

    Returns:
        ``{"iou": [C], "dice": [C], "support": [C], "miou", "mdice", "pixel_acc"}``; a class absent
        from both truth and prediction has NaN scores and is left out of the means.
    """
    cm = confusion.double()
    tp, truth, pred = cm.diag(), cm.sum(1), cm.sum(0)
    present = (truth + pred) > 0
    iou = torch.where(present, tp / (truth + pred - tp).clamp_min(1), torch.nan)
    dice = torch.where(present, 2 * tp / (truth + pred).clamp_min(1), torch.nan)
    mean = lambda t: float(t[present].mean()) if present.any() else 0.0  # noqa: E731
    return {"iou": iou.tolist(), "dice": dice.tolist(), "support": truth.long().tolist(), "miou": mean(iou),
            "mdice": mean(dice), "pixel_acc": float(tp.sum() / cm.sum().clamp_min(1))}


class SegmenterModule(pl.LightningModule):
    """An smp decoder on a timm encoder (``tu-<name>``); logs ``{train,val,test}/loss`` and
    ``val/miou``, ``val/dice``, ``val/pixel_acc``, ``val/miou_best`` (and ``test/*``).

    Args:
        backbone: timm encoder name (``resnet34``, ``vgg19``, ``efficientnet_b0``...).
        num_classes: Number of classes (filled from the data set).
        class_names: Class names in index order.
        encoder: smp encoder name; None means ``"tu-" + backbone`` (any timm model).
        decoder: smp architecture: ``unet``, ``fpn``, ``unetplusplus``, ``deeplabv3plus``, ``linknet``...
        encoder_depth: Encoder stages used (the input stride is ``2 ** encoder_depth``).
        decoder_channels: U-Net decoder widths (one per stage); None: smp's default.
        pretrained: Encoder weights from timm's hub (online).
        pretrained_file: Encoder weights from a local timm state-dict file (a classifier's head is dropped).
        image_size: Training crop side (recorded for predict).
        mean: Per-channel mean in [0, 1], applied on the device.
        std: Per-channel std.
        crop_pct: Recorded only.
        interpolation: Recorded for predict.
        loss: ``ce``, ``dice`` or ``dice_ce`` (sum of both), from ``smp.losses``.
        ignore_index: Mask value skipped by loss and metrics (also the padding value of the data module).
        overlay_count: Validation images drawn into ``plots/val_overlays.png`` at the end of fitting.
        optimizer: ``_target_`` config of a ``torch.optim`` optimizer.
        scheduler: ``_target_`` config of a ``torch.optim.lr_scheduler`` class, stepped every batch.
        channels_last: Channels-last memory format.
        weight_decay_norm_bias: Also decay norm weights and biases (on: every parameter is decayed, as
            this module always did; the classifier's default is off).
    """

    KIND = "segmenter"  # the checkpoint marker's value (visionsweep.checkpoints dispatches on it)

    def __init__(
        self, backbone: str, num_classes: int, class_names: Sequence[str] | None = None,
        encoder: str | None = None, decoder: str = "unet", encoder_depth: int = 5,
        decoder_channels: Sequence[int] | None = None, pretrained: bool = False,
        pretrained_file: str | None = None, image_size: int = 224,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225),
        crop_pct: float = 1.0, interpolation: str = "bilinear", loss: str = "dice_ce", ignore_index: int = 255,
        overlay_count: int = 8, optimizer: dict | None = None, scheduler: dict | None = None,
        channels_last: bool = False, weight_decay_norm_bias: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if loss not in LOSSES:
            raise ConfigError(f"model.loss={loss}: choose from {', '.join(LOSSES)}")
        self.class_names = list(class_names or [str(i) for i in range(num_classes)])
        if encoder and encoder.startswith("tu-") and encoder[3:].split(".")[0] != backbone.split(".")[0]:
            log.warning("model.encoder=%s but model.backbone=%s gives the input size and mean/std: set "
                        "model.backbone=%s instead", encoder, backbone, encoder[3:])
        self.net = build_net(encoder or f"tu-{backbone}", decoder, num_classes, encoder_depth, decoder_channels,
                             pretrained, pretrained_file)
        self.stride = int(getattr(self.net.encoder, "output_stride", 2 ** encoder_depth))
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.pixels = PixelNormalize(mean, std, torch.contiguous_format)  # channels-last after padding, below
        self.ce = nn.CrossEntropyLoss(ignore_index=ignore_index)
        self.dice = smp.losses.DiceLoss(smp.losses.MULTICLASS_MODE, ignore_index=ignore_index)
        cm = dict(num_classes=num_classes, ignore_index=ignore_index)
        self.val_cm, self.test_cm = MulticlassConfusionMatrix(**cm), MulticlassConfusionMatrix(**cm)
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_miou_best = MaxMetric()
        self.test_report: dict[str, Any] = {}
        self._overlays: list[tuple[np.ndarray, ...]] = []
        self._best_overlays: list[tuple[np.ndarray, ...]] = []
        self.optimization = Optimization(optimizer, scheduler, weight_decay_norm_bias)

    def configure_optimizers(self) -> Any:
        return self.optimization.configure(self.net, self.trainer)

    def lr_scheduler_step(self, scheduler: Any, metric: Any = None) -> None:
        self.optimization.step_scheduler(scheduler, metric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``B x C x H x W`` for a uint8 batch ``B x 3 x H x W`` of any size."""
        return padded_logits(self.net, self.pixels, self.stride, x, bool(self.hparams.channels_last))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # what the checkpoint holds, for visionsweep.checkpoints (plain strings: weights-only loadable)
        checkpoint.setdefault("visionsweep", {})["kind"] = self.KIND

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        name = self.hparams.loss
        loss = (self.ce(logits, y) if name != "dice" else 0) + (self.dice(logits, y) if name != "ce" else 0)
        return loss, logits.argmax(1), y

    def on_fit_start(self) -> None:
        for cb in self.trainer.callbacks:
            monitor = getattr(cb, "monitor", None)
            if monitor and monitor.split("/")[-1] in ("acc", "acc_best"):
                raise ConfigError(f"{type(cb).__name__} monitors '{monitor}', which a segmentation model does not "
                                  "log: add task=segment (monitors val/miou) or set its monitor to val/miou")

    def on_train_start(self) -> None:
        self.val_loss.reset()
        self.val_cm.reset()
        self.val_miou_best.reset()
        self._best_overlays = []

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._step(batch)
        self.train_loss(loss)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, preds, y = self._step(batch)
        self.val_loss(loss)
        self.val_cm.update(preds, y)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        if batch_idx == 0:
            self._overlays = []
        room = self.hparams.overlay_count - len(self._overlays)
        for img, truth, pred in list(zip(batch[0], y, preds))[:max(room, 0)]:
            self._overlays.append((img.permute(1, 2, 0).cpu().numpy(), truth.cpu().numpy(), pred.cpu().numpy()))

    def on_validation_epoch_end(self) -> None:
        s = scores(self.val_cm.compute())
        self.val_cm.reset()
        for key in ("miou", "pixel_acc"):
            self.log(f"val/{key}", s[key], sync_dist=True, prog_bar=key == "miou")
        self.log("val/dice", s["mdice"], sync_dist=True)
        if self.trainer.sanity_checking:
            return
        if not self._best_overlays or s["miou"] > float(self.val_miou_best.compute()):
            self._best_overlays = list(self._overlays)  # drawn at the end: the best epoch's predictions
        self.val_miou_best(torch.tensor(s["miou"]))
        self.log("val/miou_best", self.val_miou_best.compute(), sync_dist=True)

    def on_fit_end(self) -> None:
        if self._best_overlays and self.trainer.is_global_zero and self.trainer.default_root_dir:
            path = Path(self.trainer.default_root_dir) / "plots" / "val_overlays.png"
            write_overlays(self._best_overlays, path, self.class_names, self.hparams.ignore_index)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, preds, y = self._step(batch)
        self.test_loss(loss)
        self.test_cm.update(preds, y)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        cm = self.test_cm.compute()
        self.test_cm.reset()
        s = scores(cm)
        self.log("test/miou", s["miou"])
        self.log("test/dice", s["mdice"])
        self.log("test/pixel_acc", s["pixel_acc"])
        nan = lambda v: None if v != v else round(v, 6)  # noqa: E731 - JSON has no NaN
        self.test_report = {
            "per_class": {n: {"iou": nan(i), "dice": nan(d), "pixels": p}
                          for n, i, d, p in zip(self.class_names, s["iou"], s["dice"], s["support"])},
            "miou": round(s["miou"], 6), "mdice": round(s["mdice"], 6),
            "confusion_matrix": cm.long().tolist(),
        }

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(1)


def padded_logits(net: nn.Module, pixels: nn.Module, stride: int, x: torch.Tensor,
                  channels_last: bool = False) -> torch.Tensor:
    """``net``'s logits for a uint8 batch of any size: normalise, pad to ``stride``, run, crop back.

    Shared by :class:`SegmenterModule` and the exported model (``models/deploy.py``).
    """
    h, w = x.shape[-2:]
    x = pixels(x)
    ph, pw = -h % stride, -w % stride
    if ph or pw:  # zero after normalisation = the mean colour
        x = F.pad(x, (0, pw, 0, ph))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return net(x)[..., :h, :w]


def build_net(encoder: str, decoder: str, num_classes: int, depth: int = 5,
              decoder_channels: Sequence[int] | None = None, pretrained: bool = False,
              pretrained_file: str | None = None) -> nn.Module:
    """An smp model ``decoder`` on ``encoder`` with ``num_classes`` output channels.

    Args:
        encoder: ``tu-<timm name>`` (any timm model with ``features_only``) or an smp encoder name.
        decoder: smp architecture name (``unet``, ``fpn``...).
        num_classes: Output channels.
        depth: Encoder stages.
        decoder_channels: U-Net-family decoder widths (``depth`` values).
        pretrained: Hub weights (fails fast offline, with the fix in the message).
        pretrained_file: Local timm state dict for a ``tu-`` encoder.

    Raises:
        ConfigError: Unknown encoder/decoder, missing weights file, hub unreachable.
    """
    kwargs: dict[str, Any] = {"encoder_depth": int(depth)}
    if decoder_channels:
        kwargs["decoder_channels"] = list(decoder_channels)
    weights: Any = None
    if encoder.startswith("tu-"):
        check_backbone(encoder[3:])
    if pretrained_file:
        path = Path(pretrained_file).expanduser()
        if not path.is_file() or not encoder.startswith("tu-"):
            raise ConfigError(f"model.pretrained_file '{pretrained_file}' must be an existing file and "
                              f"model.encoder a tu-<timm name> (got {encoder})")
        weights, kwargs["pretrained_cfg_overlay"] = True, {"file": str(path.resolve())}
    elif pretrained:
        if not hub_reachable(encoder):
            raise ConfigError(f"model.pretrained=true needs the hub weights of '{encoder}' but the hub cannot be "
                              "reached: run online once, or give model.pretrained_file=/path/weights.pth")
        weights = True if encoder.startswith("tu-") else "imagenet"
    try:
        return smp.create_model(decoder, encoder_name=encoder, encoder_weights=weights, classes=num_classes,
                                **kwargs)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot build model.decoder={decoder} on model.encoder={encoder}: {first}") from e


PALETTE = np.array([(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)], np.uint8)


def palette(n: int = 256) -> np.ndarray:
    """``n x 3`` uint8 colours: distinct ones first, then seeded random ones."""
    extra = np.random.default_rng(0).integers(0, 256, (max(n - len(PALETTE), 0), 3), dtype=np.uint8)
    return np.concatenate([PALETTE, extra])[:n]


def colorize(mask: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """``H x W`` class indices → ``H x W x 3`` colours (ignored pixels white)."""
    out = palette()[mask.astype(np.int64) % 256]
    out[mask == ignore_index] = 255
    return out


def write_overlays(samples: Sequence[tuple[np.ndarray, ...]], path: Path, class_names: Sequence[str],
                   ignore_index: int = 255) -> Path:
    """A PNG with one row per sample: image | truth | prediction (Agg backend, class legend).

    Args:
        samples: ``(HWC uint8 image, HW truth, HW prediction)`` triples.
        path: Destination PNG (parents created).
        class_names: Names for the legend.
        ignore_index: Truth value drawn white.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = len(samples)
    fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows + 0.5), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.3 / (2 * rows + 0.5), bottom=0.5 / (2 * rows + 0.5),
                        wspace=0.05, hspace=0.05)
    for r, (img, truth, pred) in enumerate(samples):
        for c, (title, arr) in enumerate((("image", img), ("truth", colorize(truth, ignore_index)),
                                          ("prediction", colorize(pred, ignore_index)))):
            axes[r, c].imshow(arr, interpolation="nearest")
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(title, fontsize=9)
    colours = palette(len(class_names)) / 255.0
    fig.legend(handles=[Patch(color=colours[i], label=n) for i, n in enumerate(class_names)],
               loc="lower center", ncol=min(len(class_names), 6), fontsize=7, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def predict_folder(model: SegmenterModule, images: str | Path, out_dir: str | Path, resize: bool = True,
                   skipped: dict[Path, str] | None = None) -> list[Path]:
    """Write ``<out_dir>/<stem>.png`` class-index masks (palette PNGs) for an image or every image in a folder.

    Args:
        model: A trained module (``visionsweep.checkpoints.load(path).model``).
        images: An image file, or a folder of images (direct children).
        out_dir: Destination folder (created).
        resize: Resize the short side to the model's ``image_size`` first (the training scale); the
            logits are resized back, so every mask has its image's size either way.
        skipped: None: an unreadable file raises :class:`visionsweep.data.images.BadImageError`. A dict:
            unreadable files get no mask and are added to it (``{path: reason}``).

    Returns:
        The written mask paths.
    """
    from PIL import Image

    from visionsweep.data import scan
    from visionsweep.data.images import BadImageError, load_rgb
    from visionsweep.errors import DataError

    folder, out = Path(images).expanduser(), Path(out_dir).expanduser()
    if folder.is_file():
        paths = [folder]
    elif folder.is_dir():
        paths, _ = scan.list_images(folder)
    else:
        raise DataError(f"input '{folder}' does not exist: give an image or a folder of images")
    if not paths:
        raise DataError(f"no images in '{folder}'")
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    written, flat = [], palette().flatten().tolist()
    for path in paths:
        try:
            rgb = load_rgb(path)
        except BadImageError as e:
            if skipped is None:
                raise
            skipped[path] = e.reason or str(e)
            continue
        img = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(model.device)
        h, w = img.shape[-2:]
        x = img
        if resize:
            f = model.hparams.image_size / min(h, w)
            x = F.interpolate(img.float(), size=(max(1, round(h * f)), max(1, round(w * f))), mode="bilinear",
                              antialias=f < 1, align_corners=False).round().clamp(0, 255)
        logits = model(x)
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        mask = Image.fromarray(logits.argmax(1)[0].to(torch.uint8).cpu().numpy())
        mask.putpalette(flat)  # L → P: the indices stay the pixel values, the palette makes them visible
        written.append(out / f"{path.stem}.png")
        with atomic_open(written[-1], "wb", fsync=False) as f:
            mask.save(f, format="PNG")
    return written
