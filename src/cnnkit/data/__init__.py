"""Classification datasets: embedded digits, MNIST IDX, CIFAR-10 batches and class folders.

``load_dataset(source, size)`` returns :class:`Splits` (train, val, classes, channels, description);
both dataset kinds yield ``(float32 (C, H, W) in [0, 1], int label)``.
"""

from cnnkit.data.classification import load_dataset
from cnnkit.data.common import ArrayDataset, Splits, compute_mean_image, labels_of, stratified_split
from cnnkit.data.folder import IMAGE_EXTENSIONS, FolderDataset, load_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayDataset",
    "FolderDataset",
    "Splits",
    "compute_mean_image",
    "labels_of",
    "load_dataset",
    "load_image",
    "stratified_split",
]
