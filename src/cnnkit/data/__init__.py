"""Classification datasets: embedded digits, MNIST IDX, CIFAR-10 batches and class folders.

``load_dataset(source, size)`` returns :class:`Splits` (train, val, classes, channels, description);
both dataset kinds yield ``(float32 (C, H, W) in [0, 1], int label)``. Training-time augmentations,
applied to batches on the device, are in :mod:`cnnkit.data.augment` (``parse_augment("crop,flip", size)``).
"""

from cnnkit.data.augment import AUGMENTATION_NAMES, Compose, Transform, parse_augment, rgb_pca
from cnnkit.data.classification import load_dataset
from cnnkit.data.common import ArrayDataset, Splits, compute_mean_image, labels_of, stratified_split
from cnnkit.data.folder import IMAGE_EXTENSIONS, FolderDataset, load_image

__all__ = [
    "AUGMENTATION_NAMES",
    "IMAGE_EXTENSIONS",
    "ArrayDataset",
    "Compose",
    "FolderDataset",
    "Splits",
    "Transform",
    "compute_mean_image",
    "labels_of",
    "load_dataset",
    "load_image",
    "parse_augment",
    "rgb_pca",
    "stratified_split",
]
