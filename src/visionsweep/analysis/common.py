"""Inputs shared by the ``see`` modes: image paths, checkpoints (classifier or segmenter) with their run,
model-ready tensors, and image-level scores of either kind of model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from visionsweep.errors import ConfigError

NO_AUGMENTATION = {"name": "none", "resize_first": True, "train": []}


def image_paths(image: str | None, limit: int | None = None) -> list[Path]:
    """The image files ``image=`` names: one file, or every image in a folder (sorted, recursive).

    Args:
        image: a file or folder path.
        limit: keep at most this many (None: all).

    Raises:
        ConfigError: the path does not exist, or the folder holds no images.
    """
    from visionsweep.data.images import is_image_file

    path = Path(str(image)).expanduser()
    if not path.exists():
        raise ConfigError(f"image='{image}' does not exist: give an image file or a folder of images")
    if path.is_file():
        if not is_image_file(path):
            raise ConfigError(f"image='{image}' is not an image file (.png, .jpg, ...)")
        return [path.resolve()]
    found = sorted(p.resolve() for p in path.rglob("*") if p.is_file() and is_image_file(p)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not found:
        raise ConfigError(f"image='{image}': the folder holds no images (.png, .jpg, ...)")
    return found[:limit] if limit else found


def load_images(paths: list[Path]) -> list[np.ndarray]:
    """Decode files as uint8 HWC RGB arrays (DataError naming a bad file)."""
    from visionsweep.data.images import load_rgb

    return [load_rgb(p) for p in paths]


@dataclass
class Checkpoint:
    """A loaded classifier or segmenter with the training run it came from."""

    model: Any
    path: Path
    run_dir: Path
    train_cfg: DictConfig | None
    kind: str = "classifier"

    @property
    def segment(self) -> bool:
        """Whether the model is a segmenter (class scores per pixel)."""
        return self.kind == "segmenter"

    @property
    def backbone(self) -> torch.nn.Module:
        """The timm network whose stages the model modes look at (see :func:`backbone`)."""
        return backbone(self.model)

    def predicted(self, probs: torch.Tensor) -> list[int]:
        """Each image's predicted class (see :func:`predicted`)."""
        return predicted(self.model, probs)

    @property
    def hp(self) -> Any:
        """The checkpoint's hyper-parameters (image_size, mean, std, class_names, backbone...)."""
        return self.model.hparams

    @property
    def classes(self) -> list[str]:
        """Class names in label order."""
        return list(self.model.class_names)

    def eval_transform(self) -> Any:
        """The eval view the model was tested on (resize short side + centre crop)."""
        from visionsweep import augment

        hp = self.hp
        return augment.build_pipelines(NO_AUGMENTATION, int(hp.image_size), float(hp.crop_pct),
                                       str(hp.interpolation), seed=0)[1]

    def prepare(self, images: list[np.ndarray]) -> torch.Tensor:
        """Model-ready uint8 NCHW batch of the eval view of ``images``."""
        tf = self.eval_transform()
        views = [tf(image=img)["image"] for img in images]
        return torch.from_numpy(np.stack(views).transpose(0, 3, 1, 2).copy())

    def class_index(self, name: Any) -> int:
        """Label of a class given by name or index (ConfigError listing the names)."""
        if str(name) in self.classes:
            return self.classes.index(str(name))
        try:
            idx = int(name)
        except (TypeError, ValueError):
            idx = -1
        if 0 <= idx < len(self.classes):
            return idx
        raise ConfigError(f"class '{name}' is not one of the checkpoint's classes: {', '.join(self.classes)}")


def load_checkpoint(cfg: DictConfig) -> Checkpoint:
    """Load ``cfg.ckpt_path`` (a path, or ``latest``) through :mod:`visionsweep.checkpoints` (weights-only, CPU).

    Raises:
        ConfigError: no ckpt_path, a missing file, or a file that is not a safe visionsweep checkpoint.
    """
    from visionsweep import checkpoints

    if not cfg.get("ckpt_path"):
        raise ConfigError(f"see={cfg.see.name} needs a trained model: "
                          "ckpt_path=<run>/checkpoints/<name>.ckpt (or ckpt_path=latest)")
    loaded = checkpoints.load(cfg.ckpt_path, cfg.paths.log_dir)
    return Checkpoint(loaded.model, loaded.path, loaded.run_dir, loaded.train_config(), loaded.kind)


def backbone(model: Any) -> torch.nn.Module:
    """The timm network with the stages (``feature_info``): a classifier's net, a segmenter's encoder."""
    from visionsweep.checkpoints import is_segmenter

    return model.net.encoder.model if is_segmenter(model) else model.net


def image_scores(model: Any, x: torch.Tensor) -> torch.Tensor:
    """``N x classes`` scores to attribute: a classifier's logits, a segmenter's logits averaged over pixels."""
    from visionsweep.checkpoints import is_segmenter

    out = model(x)
    return out.mean(dim=(2, 3)) if is_segmenter(model) else out


def image_probs(model: Any, x: torch.Tensor) -> torch.Tensor:
    """``N x classes`` probabilities: a classifier's (softmax at its temperature; multi-label: a sigmoid per
    class), a segmenter's mean per-pixel softmax (class share)."""
    from visionsweep.checkpoints import is_segmenter

    out = model(x)
    if is_segmenter(model):
        return out.softmax(dim=1).mean(dim=(2, 3))
    to_probs = getattr(model, "probabilities", None)  # the checkpoint's temperature (or a sigmoid per class)
    return to_probs(out) if to_probs is not None else out.softmax(dim=1)


def predicted(model: Any, probs: torch.Tensor) -> list[int]:
    """The argmax class per image; for a segmenter the largest class other than ``background``
    (which covers most of nearly every image, so would say nothing)."""
    from visionsweep.checkpoints import is_segmenter

    names = list(model.class_names)
    if is_segmenter(model) and len(names) > 1 and names[0] == "background":
        return (probs[:, 1:].argmax(1) + 1).tolist()
    return probs.argmax(1).tolist()


POOL = 512  # val images scored when picking confident examples (enough for every class, still quick)


def run_images(ck: Checkpoint, cfg: DictConfig, limit: int,
               index: Any = None) -> tuple[list[Path], list[int | None]]:
    """Images for a model mode: ``image=`` if given, else from the checkpoint run's val split.

    Without ``image=``, ``see.pick`` chooses: ``confident`` (default of occlusion / gradcam) takes, class by
    class in turn, the correctly classified val images the model is surest of, so a map explains evidence
    the model really uses; ``first`` takes the first image of each class in split order. A note saying how
    they were chosen goes to ``index``.

    Args:
        ck: the checkpoint.
        cfg: the see config (``image``, ``see.pick``).
        limit: at most this many images.
        index: where the note goes (None: nowhere).

    Returns:
        The paths and their true labels (None where unknown; a parent folder named after a class counts).
    """
    if cfg.get("image"):
        paths = image_paths(cfg.image, limit)
        labels = [ck.classes.index(p.parent.name) if p.parent.name in ck.classes else None for p in paths]
        return paths, labels
    dm = run_datamodule(ck, cfg)
    if ck.segment:  # (image, mask) pairs: no image-level label
        return [Path(p) for p, _ in dm.val_samples[:limit]], [None] * min(limit, len(dm.val_samples))
    # a multi-label image stands for its first class (None without one); "correct": that class is found
    multi = bool(getattr(ck.model, "multilabel", False))
    pool = [(Path(p), (y.index(1) if 1 in y else None) if multi else int(y)) for p, y in dm.val_samples]
    pick = str(cfg.see.get("pick") or "first")
    if pick not in ("first", "confident"):
        raise ConfigError(f"see.pick={pick}: use confident or first")
    if pick == "confident":
        pool = pool[:POOL]
        with torch.no_grad():
            probs = torch.cat([image_probs(ck.model, ck.prepare(load_images([p for p, _ in pool[i:i + 64]])))
                               for i in range(0, len(pool), 64)])
        found = ck.model.decide(probs) if multi else None
        right = [k for k, (_, y) in enumerate(pool)
                 if y is not None and (bool(found[k, y]) if multi else int(probs[k].argmax()) == y)]
        right.sort(key=lambda k: -float(probs[k, pool[k][1]]))
        wrong = sorted(set(range(len(pool))) - set(right))
        pool = [pool[k] for k in right + wrong]  # surest correct first; the rest only if a class has none right
    samples, seen = [], set()
    for path, label in pool:  # one per class first, then fill up in order
        if label not in seen:
            samples.append((path, label))
            seen.add(label)
    samples += [s for s in pool if s not in samples]
    samples = samples[:limit]
    if index is not None and pick == "confident":
        index.note(f"no image= given: {len(samples)} val images (see.max_images), each of another class while "
                   f"classes last: of each class the one (of {len(pool)} scored) the model classifies correctly "
                   "with the highest probability")
    elif index is not None:
        index.note(f"no image= given: the first val image of each class, {len(samples)} (see.max_images)")
    return [p for p, _ in samples], [y for _, y in samples]


def checkpoint_and_images(cfg: DictConfig, index: Any) -> tuple[Checkpoint, list[Path], list, torch.Tensor]:
    """The ``see`` modes' common start: the checkpoint, its images (``image=`` or chosen, ``see.max_images``,
    default 4), their labels (None where unknown) and the prepared batch."""
    ck = load_checkpoint(cfg)
    paths, labels = run_images(ck, cfg, int(cfg.see.get("max_images") or 4), index)
    return ck, paths, labels, ck.prepare(load_images(paths))


def run_datamodule(ck: Checkpoint, cfg: DictConfig) -> Any:
    """The checkpoint run's data module with the run's own split (as ``visionsweep.eval`` builds it)."""
    from visionsweep import builders

    return builders.checkpoint_datamodule(ck.model, ck.path, ck.run_dir, ck.train_cfg, cfg.get("data_root"),
                                          fallback="; give image=<file or folder> instead")


def uint8_hwc(batch: torch.Tensor) -> np.ndarray:
    """uint8 NCHW tensor → uint8 NHWC array for plotting."""
    return batch.detach().cpu().numpy().transpose(0, 2, 3, 1)


def short_title(path: Path, width: int = 22) -> str:
    """A file name cut to fit above a grid cell."""
    name = path.name
    return name if len(name) <= width else name[: width - 3] + "..."


def image_title(ck: Checkpoint, path: Path, label: int | None) -> str:
    """``<true class>: <file>`` (or just the file when the class is unknown)."""
    from visionsweep.utils.text import plain  # a class or file named "$x^$" must not switch on mathtext

    return plain(f"{ck.classes[label]}: {short_title(path, 14)}" if label is not None else short_title(path))
