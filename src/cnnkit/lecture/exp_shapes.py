"""Generated shapes, a whole-map training task and the two nets of the sections "direct_maps" and
"strided_fcn".

Images are 32 x 32 grey: a bright striped disc or square (class 1) on a darker blob texture (class 0),
with noise. The object's centre is drawn from a band of columns, so that a training set can hold
objects in one region only (``TRAIN_COLUMNS``) and a test set the same objects moved (``SHIFTED_COLUMNS``).

Two nets label every pixel:

- ``direct_map_net`` (Luo, Wang, Tang, ICCV 2013, "directly predict segmentation maps"): conv layers
  and a fully connected head whose output *is* the K x 32 x 32 map;
- the ``segment`` patch classifier (a 20 x 20 patch -> the label of its centre), trained and run
  exactly densely (``cnnkit.dense.densify``, Li, Zhao, Wang arXiv:1412.4526).

Both are trained by the one engine (``cnnkit.train.runner.fit``) through :class:`MapTask`: the loss is
the pixelwise cross-entropy of the whole (N, K, H, W) output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from cnnkit.dense import densify
from cnnkit.models import create_patch_net
from cnnkit.train.checkpoint import load_checkpoint, load_weights
from cnnkit.train.classification import make_loader
from cnnkit.train.config import TrainConfig
from cnnkit.train.engine import optimizer_step
from cnnkit.train.task import Task

SIZE = 32
PATCH = 20  # the patch classifier's patch (segment net: 20 -> 18 -> 16 -> 8 -> 6 -> 4 -> 2, FC reads 16 x 2 x 2)
TOTAL_STRIDE = 4  # its two 2 x 2 / 2 max-pools
TRAIN_COLUMNS = (7.0, 13.0)  # object centres during training: the left part of the image
SHIFTED_COLUMNS = (19.0, 25.0)  # the same objects moved 12 pixels to the right
CLASSES = ["background", "object"]
BLUR = np.exp(-0.5 * (np.arange(-3, 4) / 1.5) ** 2)  # the background's blobs: smoothed noise, thresholded
DIRECT_MAP = "cnnkit.lecture.exp_shapes:direct_map_net"


def shapes(n: int, seed: int, columns: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 1, 32, 32), about zero mean and unit spread, and their labels (n, 32, 32): one
    object each, its centre's column uniform in ``columns`` and its row in [8, 24]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    images, labels = [], []
    for _ in range(n):
        noise = rng.normal(size=(SIZE + 6, SIZE + 6))
        for axis in (0, 1):
            noise = np.apply_along_axis(np.convolve, axis, noise, BLUR, mode="same")
        blobs = np.sign(noise[3:-3, 3:-3])
        cy, cx, r = rng.uniform(8, 24), rng.uniform(*columns), rng.uniform(3.5, 6.0)
        if rng.random() < 0.5:
            region = (y - cy) ** 2 + (x - cx) ** 2 < r**2
        else:
            region = (abs(y - cy) < r) & (abs(x - cx) < r * rng.uniform(0.7, 1.3))
        angle, period = rng.uniform(0, np.pi), rng.uniform(3.0, 5.0)
        stripes = np.sign(np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period))
        image = np.where(region, 1.2 + 0.3 * stripes, -0.6 + 0.3 * blobs) + rng.normal(0, 0.15, (SIZE, SIZE))
        images.append(image[None])
        labels.append(region)
    return (torch.from_numpy(np.stack(images).astype(np.float32)),
            torch.from_numpy(np.stack(labels).astype(np.int64)))


def direct_map_net(num_classes: int = 2, in_chans: int = 1, size: int = SIZE, hidden: int = 256) -> nn.Module:
    """Conv 5x5 16, pool 2, conv 5x5 32, pool 2, FC ``hidden``, FC K*size*size reshaped to (K, size, size):
    every output pixel has its own weights, so the prediction depends on where the pixel is."""
    m = ((size - 4) // 2 - 4) // 2
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(in_chans, 16, 5))
    model.add_module("relu1", nn.ReLU())
    model.add_module("pool1", nn.MaxPool2d(2))
    model.add_module("conv2", nn.Conv2d(16, 32, 5))
    model.add_module("relu2", nn.ReLU())
    model.add_module("pool2", nn.MaxPool2d(2))
    model.add_module("flatten", nn.Flatten())  # (B, 32 * m * m)
    model.add_module("fc3", nn.Linear(32 * m * m, hidden))
    model.add_module("relu3", nn.ReLU())
    model.add_module("fc4", nn.Linear(hidden, num_classes * size * size))
    model.add_module("map", nn.Unflatten(1, (num_classes, size, size)))  # (B, K, size, size)
    model.model_options = {"num_classes": num_classes, "in_chans": in_chans, "size": size, "hidden": hidden}
    return model


def patch_net() -> nn.Module:
    model, _ = create_patch_net("segment", num_classes=2, in_chans=1, width=8, patch=PATCH)
    return model


def dense(model: nn.Module) -> nn.Module:
    """The patch classifier run exactly densely: Algorithm 1 of the lecture (d-regularly sparse kernels)."""
    return densify(model, PATCH, border="replicate", mode="dilated")


@dataclass
class MapConfig(TrainConfig):
    """A whole-map training run: the runner's settings; ``model`` names a registered net or a
    ``package.module:function`` (the direct-map net)."""

    data: str = "generated shapes"
    optimizer: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    batch_size: int = 8

    def check_model(self) -> None:
        if ":" not in self.model:
            super().check_model()


class MapTask(Task):
    """Pixelwise classification of whole images by a net whose output is the whole (N, K, H, W) map:
    ``wrap(model)`` is that net (the model itself for the direct-map net, its dense twin for a patch
    classifier). Held-out score: IoU of the object class."""

    name = "lecture-map"
    command = "cnnkit lecture --only direct_maps"  # what reproduces these runs (config.toml's first line)
    metric_columns = ["epoch", "lr", "train_loss", "train_pixel_accuracy", "val_loss", "val_pixel_accuracy",
                      "val_iou", "seconds"]
    select_key = "val_iou"

    def __init__(self, build: Callable[[], nn.Module], wrap: Callable[[nn.Module], nn.Module],
                 train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor]):
        self.build, self.wrap, self.train_set, self.val_set = build, wrap, TensorDataset(*train), val

    def prepare(self, cfg, ctx) -> None:
        self.classes, self.channels = CLASSES, 1
        # class-balanced loss (inverse class frequency): objects are 8% of the pixels
        counts = torch.bincount(self.train_set.tensors[1].flatten(), minlength=2).double()
        self.weight = (counts.sum() / (2 * counts.clamp_min(1))).float()
        self.description = (f"generated shapes: {len(self.train_set)} training / {len(self.val_set[0])} held-out "
                            f"{SIZE}x{SIZE} images")

    def build_model(self, cfg) -> nn.Module:
        self.model = self.build()
        self.net = self.wrap(self.model)
        return self.model

    def train_module(self, model: nn.Module) -> nn.Module:
        return self.net

    def train_epoch(self, net, model, optimizer, *, epoch, cfg, ctx, progress, scaler=None, averaged=None):
        net.train()
        loader = make_loader(self.train_set, cfg, ctx, shuffle=True, epoch=epoch)
        losses, correct, pixels = [], 0, 0
        for step, (x, y) in enumerate(loader, start=1):
            lo, hi, n_global = loader.batch_sampler.layout[step - 1]
            scores = net(x.to(ctx.device))
            y = y.to(ctx.device)
            losses.append(optimizer_step(F.cross_entropy(scores, y, self.weight), optimizer, epoch=epoch, batch=step,
                                         n_local=hi - lo, n_global=n_global, world_size=ctx.world_size))
            correct += int((scores.argmax(1) == y).sum())
            pixels += y.numel()
        return {"loss": sum(losses) / len(losses), "pixel_accuracy": correct / pixels}

    @torch.no_grad()
    def evaluate(self, model, *, epoch, cfg, ctx, progress):
        net = self.net if model is self.model else self.wrap(model)
        scores = predict_scores(net, self.val_set[0].to(ctx.device)).cpu()
        metrics = scores_metrics(scores.argmax(1), self.val_set[1])
        metrics["loss"] = float(F.cross_entropy(scores, self.val_set[1]))
        return metrics, None


@torch.no_grad()
def predict_scores(net: nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    net.eval()
    return torch.cat([net(images[i : i + batch]) for i in range(0, len(images), batch)])


def scores_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Pixel accuracy and the object class's IoU (intersection over union) over all images."""
    inter = int(((pred == 1) & (target == 1)).sum())
    union = int(((pred == 1) | (target == 1)).sum())
    return {"pixel_accuracy": float((pred == target).float().mean()), "iou": inter / max(1, union)}


def train_map_net(out: Path, model: str, build, wrap, train, val, *, epochs: int, seed: int, progress,
                  lr: float = 2e-3) -> tuple[nn.Module, dict]:
    """Train (or, when ``out`` holds the finished run, reuse) through the runner; returns the model with
    the best epoch's weights and the run's summary."""
    from cnnkit.train.runner import fit

    cfg = MapConfig(model=model, out=str(out), epochs=epochs, seed=seed, device="cpu", lr=lr)
    task = MapTask(build, wrap, train, val)
    summary = fit(cfg, resume=(out / "last.safetensors").exists(), progress=progress, task=task)
    load_weights(task.model, load_checkpoint(summary["best_checkpoint"]).model_state, source=summary["best_checkpoint"])
    return task.model.eval(), summary


def trained_patch_net(out: Path, *, quick: bool, seed: int, progress) -> tuple[nn.Module, dict]:
    """The patch classifier of "direct_maps", trained densely on objects in the training region; the
    section "strided_fcn" reuses the same run folder (the second caller finds it finished)."""
    n, epochs = (192, 8) if quick else (768, 15)
    train = shapes(n, seed, TRAIN_COLUMNS)
    val = shapes(64, seed + 1, TRAIN_COLUMNS)
    run = out / "runs" / "direct_maps" / f"patch-net-{'quick' if quick else 'full'}-seed{seed}"
    return train_map_net(run, "segment", patch_net, dense, train, val, epochs=epochs, seed=seed, progress=progress)
