"""What the studies' commands share: a checkpoint's data and images, its layer names, and image tiles
written as PNG. :mod:`cnnkit.analysis.retrieval` and :mod:`cnnkit.analysis.visualize` both import
this file and neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from cnnkit.data import Splits, load_dataset, load_image
from cnnkit.errors import ConfigError
from cnnkit.train.checkpoint import Checkpoint
from cnnkit.utils import atomic_path


def checkpoint_splits(ckpt: Checkpoint, data: str | None = None, *, skip_bad_files: bool = False) -> Splits:
    """The train/held-out splits a checkpoint was trained with (re-created from its seed), or ``data``."""
    config = ckpt.meta.get("config", {})
    source = data or config.get("data", "digits")
    splits = load_dataset(source, tuple(ckpt.require("input_size")), channels=ckpt.meta.get("channels"),
                          val_fraction=config.get("val_fraction", 0.2), seed=config.get("seed", 0),
                          skip_bad_files=skip_bad_files)
    if data is None and len(splits.classes) != len(ckpt.classes):
        # a transfer base net is trained on a class subset: keep those classes, relabelled
        from cnnkit.analysis.transfer import class_subset

        keep = [splits.classes.index(c) for c in ckpt.classes if c in splits.classes]
        if len(keep) == len(ckpt.classes):
            splits = Splits(class_subset(splits.train, keep), class_subset(splits.val, keep), list(ckpt.classes),
                            splits.channels, splits.description + f", classes {', '.join(ckpt.classes)}")
    return splits


def load_images(files: list[Path], ckpt: Checkpoint) -> torch.Tensor:
    """Image files at the checkpoint's input size and channels, (N, C, H, W) in [0, 1]."""
    size, channels = tuple(ckpt.require("input_size")), ckpt.meta.get("channels", 3)
    return torch.stack([load_image(f, channels=channels, size=size) for f in files])


def check_layer(model: nn.Module, name: str) -> str:
    """``name`` if the model has a layer of that (full or short) name, else a ConfigError listing them."""
    names = [n for n, _ in model.named_modules() if n]
    if name in names or name in {n.rsplit(".", 1)[-1] for n in names}:
        return name
    short = ", ".join(n.rsplit(".", 1)[-1] for n in names if "." in n or n not in ("features", "classifier"))
    raise ConfigError(f"model has no layer named {name!r}; layers: {short}")


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write an (H, W) or (H, W, 3) uint8 array as PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


def image_tile(image: torch.Tensor, size: int) -> np.ndarray:
    """A (C, H, W) image in [0, 1] as a (size, size, 3) uint8 tile (nearest neighbour: pixels stay crisp)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().cpu()
    array = array.expand(3, -1, -1) if array.shape[0] == 1 else array[:3]
    return np.asarray(Image.fromarray(array.permute(1, 2, 0).numpy()).resize((size, size), Image.NEAREST))
