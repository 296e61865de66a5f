"""Pictures of a segmentation run: held-out images beside their true and predicted label maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnnkit.segmentation.data import IGNORE_INDEX
from cnnkit.segmentation.predict import class_colours
from cnnkit.train.plots import plt, save_figure


def _display(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) of any range -> (H, W, 3) in [0, 1], each channel stretched over its 1-99% range."""
    x = image.float()
    lo = torch.quantile(x.flatten(1)[:, ::max(1, x[0].numel() // 100_000)], 0.01, dim=1)[:, None, None]
    hi = torch.quantile(x.flatten(1)[:, ::max(1, x[0].numel() // 100_000)], 0.99, dim=1)[:, None, None]
    x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
    return x.permute(1, 2, 0).numpy()


def _colour(labels: torch.Tensor, colours: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) colours; unlabelled pixels grey."""
    out = np.full((*labels.shape, 3), 128, dtype=np.uint8)
    known = (labels != IGNORE_INDEX).numpy()
    out[known] = colours[labels.numpy()[known].clip(0, len(colours) - 1)]
    return out


def plot_examples(examples: list, path: Path, *, palette=None, title: str = "") -> None:
    """A row per (sample, probs (K, H, W)): image, truth, prediction (argmax), and for two classes
    the probability of class 1."""
    if not examples:
        return
    k = examples[0][1].shape[0]
    colours = class_colours(k, palette)
    cols = 4 if k == 2 else 3
    fig, axes = plt.subplots(len(examples), cols, figsize=(3.2 * cols, 3.2 * len(examples)), squeeze=False)
    for row, (sample, probs) in zip(axes, examples):
        panels = [(_display(sample.image), sample.name), (_colour(sample.target, colours), "truth"),
                  (_colour(probs.argmax(0), colours), "prediction")]
        if k == 2:
            panels.append((probs[1].numpy(), "P(class 1)"))
        for ax, (picture, label) in zip(row, panels):
            ax.imshow(picture, cmap="magma" if picture.ndim == 2 else None, vmin=0, vmax=1 if picture.ndim == 2
                      else None, interpolation="nearest")
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
