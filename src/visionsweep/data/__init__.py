"""Folder image data: decoding, built-in offline data sets and the Lightning data module."""

from visionsweep.data.builtin import BUILTIN, ensure_builtin, export_digits, write_shapes
from visionsweep.data.dataset import ImageFolderDataset
from visionsweep.data.folder import FolderDataModule
from visionsweep.data.images import IMAGE_EXTENSIONS, check_image, is_image_file, load_rgb
from visionsweep.data.segmentation import SegmentationDataModule
from visionsweep.data.splits import split_counts, stratified_split

__all__ = [
    "BUILTIN",
    "IMAGE_EXTENSIONS",
    "FolderDataModule",
    "ImageFolderDataset",
    "SegmentationDataModule",
    "check_image",
    "ensure_builtin",
    "export_digits",
    "is_image_file",
    "load_rgb",
    "split_counts",
    "stratified_split",
    "write_shapes",
]
