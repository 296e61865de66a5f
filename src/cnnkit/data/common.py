"""In-memory classification data, stratified splits and the training-set mean image.

The lecture (after Krizhevsky et al. 2012) preprocesses images by subtracting "the mean activity over
the training set from each pixel": :func:`compute_mean_image` computes that (C, H, W) mean image.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from tqdm import tqdm

from cnnkit.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# ITU-R 601-2 luma, the weights Pillow uses for RGB -> 'L': arrays and image folders agree.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_RESIZE_CHUNK = 1024  # images resized per interpolate call: bounds the float32 temporary


@dataclass
class Splits:
    """A train/val pair with what a trainer needs to know about it."""

    train: Dataset
    val: Dataset
    classes: list[str]
    channels: int
    description: str  # e.g. "digits (sklearn): 1438 train / 359 val, 10 classes, 8x8 -> 32x32"


def check_size(size) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ConfigError(f"image size {size!r} is not (height, width); pass two positive integers") from None
    if h < 1 or w < 1:
        raise ConfigError(f"image size {size!r} must be positive; pass e.g. (32, 32)")
    return h, w


def check_channels(channels) -> int:
    if channels not in (1, 3):
        raise ConfigError(f"channels={channels!r} is not supported; use 1 (grayscale) or 3 (RGB)")
    return int(channels)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of a (N, C, H, W) uint8 or float stack, in chunks; keeps the dtype.

    uint8 results are rounded back to uint8, as an image library would: the data was 8-bit to begin
    with, and keeping it uint8 makes large upsampled sets (CIFAR at 224 x 224) take 4x less memory.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = torch.empty((*images.shape[:2], *size), dtype=images.dtype)
    for start in range(0, len(images), _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        resized = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False, antialias=True)
        if images.dtype == torch.uint8:
            resized = resized.round_().clamp_(0, 255)
        else:
            resized = resized.clamp_(0, 1)
        out[start : start + _RESIZE_CHUNK] = resized
    return out


def rgb_to_luma(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) with the 601-2 weights; uint8 stays uint8 (rounded)."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1)
    out = torch.empty((len(images), 1, *images.shape[2:]), dtype=images.dtype)
    for start in range(0, len(images), _RESIZE_CHUNK):
        luma = (images[start : start + _RESIZE_CHUNK].float() * weights).sum(1, keepdim=True)
        out[start : start + _RESIZE_CHUNK] = luma.round_() if images.dtype == torch.uint8 else luma
    return out


def _as_tensor(array) -> torch.Tensor:
    if isinstance(array, np.ndarray) and not array.flags.writeable:  # np.frombuffer of bytes: torch
        array = array.copy()  # cannot share read-only memory
    return torch.as_tensor(array)


class ArrayDataset(Dataset):
    """Images held in memory as one (N, C, H, W) tensor, resized once at construction.

    ``images`` is uint8 (0..255) or floating point in [0, 1]; uint8 stays uint8 in memory and is
    scaled per item. ``channels`` converts: 3 -> 1 by luma (done here, it shrinks memory), 1 -> 3 by
    replicating the channel per item (done lazily, it would triple memory). Items are
    ``(float32 (C, H, W) in [0, 1], int label)``.
    """

    def __init__(self, images, labels, classes: Sequence[str], size: tuple[int, int] | None = None,
                 *, channels: int | None = None):
        images, labels = _as_tensor(images), _as_tensor(labels)
        if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
            raise DataError(f"ArrayDataset needs images (N, C, H, W) and labels (N,); got "
                            f"{tuple(images.shape)} and {tuple(labels.shape)}")
        if images.shape[1] not in (1, 3):
            raise DataError(f"images have {images.shape[1]} channels; ArrayDataset takes 1 or 3")
        if images.dtype != torch.uint8:
            if not images.is_floating_point():
                raise DataError(f"images of dtype {images.dtype}; pass uint8 (0..255) or float in [0, 1]")
            images = images.float()
            if len(images) and (images.min() < 0 or images.max() > 1):
                raise DataError("float images must lie in [0, 1]; divide by the maximum value first")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise DataError(f"labels of dtype {labels.dtype}; pass integer class indices")
        labels = labels.long()
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"labels must lie in [0, {len(classes)}) for {len(classes)} classes; "
                            f"got {int(labels.min())}..{int(labels.max())}")
        channels = check_channels(images.shape[1] if channels is None else channels)
        size = check_size(images.shape[-2:] if size is None else size)

        if channels == 1 and images.shape[1] == 3:
            images = rgb_to_luma(images)
        self.images = resize_images(images.contiguous(), size)  # (N, C0, H, W), C0 = 1 or channels
        self.labels = labels
        self.classes = list(classes)
        self.channels = channels
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        image = image.float().div_(255) if image.dtype == torch.uint8 else image.clone()
        if image.shape[0] != self.channels:  # gray stored, RGB asked: replicate
            image = image.repeat(self.channels, 1, 1)
        return image, int(self.labels[index])

    def subset(self, indices) -> ArrayDataset:
        """A new ArrayDataset with the given items (already at size: no second resize)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        new = ArrayDataset.__new__(ArrayDataset)
        new.images, new.labels = self.images[indices], self.labels[indices]
        new.classes, new.channels, new.size = list(self.classes), self.channels, self.size
        return new


def stratified_split(labels: torch.Tensor, val_fraction: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): each class gives round(val_fraction * n_c) of its items to val.

    A class with at least 2 items gives at least 1 to val and keeps at least 1 for training (when
    val_fraction > 0). Deterministic in ``seed``; both index lists come back sorted.
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1); e.g. 0.2 keeps 20% for validation")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    train, val = [], []
    for c in torch.unique(labels).tolist():  # sorted, so the generator is consumed in a fixed order
        members = torch.nonzero(labels == c).flatten()
        n = len(members)
        k = math.floor(val_fraction * n + 0.5)  # round half up (Python's round() rounds half to even)
        if val_fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        else:
            k = 0
        members = members[torch.randperm(n, generator=generator)]
        val.append(members[:k])
        train.append(members[k:])
    return _sorted_cat(train), _sorted_cat(val)


def _sorted_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.sort(torch.cat(parts)).values if parts else torch.zeros(0, dtype=torch.long)


def labels_of(dataset) -> torch.Tensor:
    """All labels (N,) int64, without loading images for cnnkit datasets, Subset and ConcatDataset."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([labels_of(d) for d in dataset.datasets])
    labels = getattr(dataset, "labels", None)
    if labels is not None and len(labels) == len(dataset):
        return torch.as_tensor(labels, dtype=torch.long)
    # Any other dataset: the slow way, one item at a time.
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def compute_mean_image(dataset, batch_size: int = 256, *, num_workers: int = 0) -> torch.Tensor:
    """The mean image (C, H, W) float32 of ``dataset``: the per-pixel mean the lecture subtracts.

    Summed in float64 so the result does not depend on the batch size. An ArrayDataset is averaged
    straight from its stored tensor; any other dataset is read through a DataLoader.
    """
    if len(dataset) == 0:
        raise DataError("cannot compute the mean image of an empty dataset; check the data source")
    if isinstance(dataset, ArrayDataset):
        total = torch.zeros(dataset.images.shape[1:], dtype=torch.float64)
        for start in range(0, len(dataset), batch_size * 16):
            total += dataset.images[start : start + batch_size * 16].sum(0, dtype=torch.float64)
        if dataset.images.dtype == torch.uint8:
            total /= 255
        mean = (total / len(dataset)).float()
        return mean.repeat(dataset.channels // mean.shape[0], 1, 1)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    total = None
    for images, _ in tqdm(loader, desc="mean image", leave=False, disable=not sys.stderr.isatty()):
        batch_sum = images.sum(0, dtype=torch.float64)
        total = batch_sum if total is None else total + batch_sum
    return (total / len(dataset)).float()


