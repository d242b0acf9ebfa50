"""Inference with a classifier (loaded by :mod:`visionsweep.checkpoints`): list images, predict them
(optionally with TTA).

``tta=True`` averages the softmax over 12 views: the eval view, 4 corner + centre crops of the image
resized 15 % larger, and the horizontal flip of each (fastai's ``tta`` uses augmented views too).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from visionsweep import augment
from visionsweep.data.dataset import ImageFolderDataset, collate_images
from visionsweep.data.images import is_image_file
from visionsweep.errors import DataError
from visionsweep.models.classifier import ClassifierModule

TTA_ZOOM = 1.15  # the crops of the TTA views come from the image resized this much larger


def list_images(path: str | Path) -> list[Path]:
    """One image, or every image under a folder (recursively, sorted)."""
    p = Path(str(path)).expanduser()
    if p.is_file():
        if not is_image_file(p):
            raise DataError(f"input '{path}' is not an image file (jpg, png, bmp, webp, tif)")
        return [p]
    if not p.is_dir():
        raise DataError(f"input '{path}' does not exist: give an image or a folder of images")
    found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f) and not f.name.startswith("."))
    if not found:
        raise DataError(f"input '{path}' holds no images (jpg, png, bmp, webp, tif)")
    return found


def predict_images(model: ClassifierModule, paths: list[Path], tta: bool = False, batch_size: int = 32,
                   device: str = "cpu") -> torch.Tensor:
    """Class probabilities ``[len(paths), num_classes]`` with the checkpoint's eval preprocessing."""
    hp = model.hparams
    size = int(hp.image_size)
    plain = {"name": "predict", "train": [], "resize_first": True}  # train pipeline = the eval view
    eval_tf, _ = augment.build_pipelines(plain, size, hp.crop_pct, hp.interpolation)
    loaders = [DataLoader(ImageFolderDataset([(p, -1) for p in paths], eval_tf), batch_size=batch_size,
                          collate_fn=collate_images)]
    if tta:
        zoom_tf, _ = augment.build_pipelines(plain, round(size * TTA_ZOOM), 1.0, hp.interpolation)
        loaders.append(DataLoader(ImageFolderDataset([(p, -1) for p in paths], zoom_tf),
                                  batch_size=batch_size, collate_fn=collate_images))
    model = model.to(device)
    out = []
    with torch.inference_mode():
        for batches in zip(*loaders):
            views = [batches[0][0]]
            if tta:
                from torchvision.transforms.v2.functional import five_crop

                views += list(five_crop(batches[1][0], [size, size]))
            if tta:
                views += [v.flip(-1) for v in views]
            probs = torch.stack([model(v.to(device)).softmax(dim=1) for v in views]).mean(dim=0)
            out.append(probs.cpu())
    return torch.cat(out)
