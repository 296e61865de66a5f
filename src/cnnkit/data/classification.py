"""One entry point for classification data: :func:`load_dataset` recognises the source and splits it.

Sources: ``"digits"`` (scikit-learn's bundled 8 x 8 handwritten digits, so that every command runs
offline), an MNIST-format IDX folder, a CIFAR-10 python-batches folder, or a class-folder tree.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cnnkit.data.cifar import find_cifar_folder, load_cifar_arrays
from cnnkit.data.common import ArrayDataset, Splits, check_channels, check_size, stratified_split
from cnnkit.data.folder import FolderDataset, is_class_tree, is_hidden, is_image_file
from cnnkit.data.mnist import find_idx_folder, load_idx_arrays
from cnnkit.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

EXPECTED = ("'digits', an MNIST IDX folder, a CIFAR-10 batches folder or a class-folder tree; "
            "see `cnnkit train --help`")


def load_dataset(source: str, size: tuple[int, int], *, channels: int | None = None,
                 val_fraction: float = 0.2, seed: int = 0, skip_bad_files: bool = False) -> Splits:
    """Load ``source`` at ``size`` (H, W) and split it into train and val.

    A source that ships its own split (MNIST's t10k files, CIFAR's test_batch, a folder with
    ``train/`` and ``val/`` or ``test/``) keeps it; otherwise each class gives round(val_fraction * n_c)
    of its items to val, drawn with ``torch.Generator().manual_seed(seed)``. ``channels=None`` keeps
    the natural channels (digits and MNIST 1, CIFAR and folders 3); 1 or 3 converts.
    """
    size = check_size(size)
    if channels is not None:
        check_channels(channels)
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1); e.g. 0.2 keeps 20% for validation")
    split = {"val_fraction": val_fraction, "seed": seed}
    if source == "digits":
        return _array_splits(_digits(), "digits (sklearn)", size, channels, **split)

    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"dataset {source} does not exist; pass {EXPECTED}")
    if not root.is_dir():
        raise DataError(f"dataset {root} is a file; pass {EXPECTED}")
    if (folder := find_idx_folder(root)) is not None:
        data = load_idx_arrays(folder)
        return _array_splits(data, f"{data['name']} IDX ({folder})", size, channels, **split)
    if (folder := find_cifar_folder(root)) is not None:
        return _array_splits(load_cifar_arrays(folder), f"CIFAR-10 ({folder})", size, channels, **split)
    if is_class_tree(root / "train") or is_class_tree(root):
        return _folder_splits(root, size, channels or 3, skip_bad_files=skip_bad_files, **split)
    entries = [p for p in root.iterdir() if not is_hidden(p)]
    if not entries:
        raise DataError(f"dataset folder {root} is empty; pass {EXPECTED}")
    if any(is_image_file(p) for p in entries):
        raise DataError(f"{root} has images but no class subfolders; "
                        f"put each class's images in {root}/<class>/")
    raise DataError(f"{root} is not {EXPECTED}")


def _digits() -> dict:
    from sklearn.datasets import load_digits  # imported here: it takes a second and only this needs it

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 8, 8) in 0..16 -> (N, 1, 8, 8)
    return {"train": (images, digits.target.astype(np.int64)), "val": None,
            "classes": [str(c) for c in digits.target_names]}


def _array_splits(data: dict, name: str, size, channels, *, val_fraction: float, seed: int) -> Splits:
    images, labels = data["train"]
    classes, native = data["classes"], images.shape[1]
    channels = channels or native
    if data["val"] is not None:
        train = ArrayDataset(images, labels, classes, size, channels=channels)
        val = ArrayDataset(*data["val"], classes, size, channels=channels)
        origin = " (the set's own test split)"
    else:
        train_idx, val_idx = (i.numpy() for i in stratified_split(labels, val_fraction, seed))
        train = ArrayDataset(images[train_idx], labels[train_idx], classes, size, channels=channels)
        val = ArrayDataset(images[val_idx], labels[val_idx], classes, size, channels=channels)
        origin = f" (seed {seed})"
    convert = "" if channels == native else f", {native} -> {channels} channels"
    description = (f"{name}: {len(train)} train / {len(val)} val{origin}, {len(classes)} classes, "
                   f"{images.shape[2]}x{images.shape[3]} -> {size[0]}x{size[1]}{convert}")
    return Splits(train, val, list(classes), channels, description)


def _folder_splits(root: Path, size, channels: int, *, skip_bad_files: bool, val_fraction: float,
                   seed: int) -> Splits:
    train_root, val_root = root, None
    if is_class_tree(root / "train"):  # root/train/<class>/..., with root/val or root/test beside it
        train_root = root / "train"
        val_root = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    train = FolderDataset(train_root, size, channels=channels, skip_bad_files=skip_bad_files)
    if val_root is not None:
        val = FolderDataset(val_root, size, channels=channels, classes=train.classes,
                            skip_bad_files=skip_bad_files)
        origin = f" ({val_root.name}/)"
    else:
        train_idx, val_idx = stratified_split(train.labels, val_fraction, seed)
        train, val = train.subset(train_idx), train.subset(val_idx)
        origin = f" (seed {seed})"
    description = (f"class folders ({root}): {len(train)} train / {len(val)} val{origin}, "
                   f"{len(train.classes)} classes, images -> {size[0]}x{size[1]}, {channels} channels")
    return Splits(train, val, list(train.classes), channels, description)
