"""The training engine: one epoch of SGD, and evaluation. Everything else (data, checkpoints, the run
folder) lives in ``cnnkit.train.runner``; the CLI only wires arguments.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cnnkit.errors import TrainingError
from cnnkit.train.metrics import ClassificationMeter

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _bar(iterable: Iterable, progress: bool | None, desc: str, total: int | None = None):
    disable = not sys.stderr.isatty() if progress is None else not progress
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=disable, dynamic_ncols=True)


def _prepare(x: torch.Tensor, device: torch.device, mean: torch.Tensor | None) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x - mean if mean is not None else x  # the lecture's mean-image subtraction


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    num_classes: int,
    mean: torch.Tensor | None = None,
    loss_fn: LossFn = F.cross_entropy,
    epoch: int = 0,
    progress: bool | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Train for one pass over ``loader``; returns (loss/acc1/acc5, confusion matrix)."""
    model.train()
    meter = ClassificationMeter(num_classes)
    bar = _bar(loader, progress, f"epoch {epoch} train", total=_len(loader))
    for batch, (x, y) in enumerate(bar, start=1):
        x, y = _prepare(x, device, mean), y.to(device, non_blocking=True)
        logits = model(x)
        loss = loss_fn(logits, y)
        value = loss.item()
        if not math.isfinite(value):
            lr = optimizer.param_groups[0]["lr"]
            raise TrainingError(
                f"loss became {value} at epoch {epoch}, batch {batch}; lower the learning rate "
                f"(--lr, now {lr:g}) or check the data for NaN/inf values"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.update(logits, y, value)
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
    return meter.result(), meter.confusion


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    num_classes: int,
    mean: torch.Tensor | None = None,
    loss_fn: LossFn = F.cross_entropy,
    progress: bool | None = None,
    desc: str = "evaluate",
) -> tuple[dict[str, float], torch.Tensor]:
    """Loss, top-1/top-5 accuracy and confusion matrix of ``model`` on ``loader``."""
    model.eval()
    meter = ClassificationMeter(num_classes)
    for x, y in _bar(loader, progress, desc, total=_len(loader)):
        x, y = _prepare(x, device, mean), y.to(device, non_blocking=True)
        logits = model(x)
        meter.update(logits, y, loss_fn(logits, y).item())
    return meter.result(), meter.confusion


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, *, mean: torch.Tensor | None = None,
                  batch_size: int = 256) -> torch.Tensor:
    """Class posteriors (softmax) for a batch of images already at the model's input size."""
    model.eval()
    device = next(model.parameters()).device
    out = [F.softmax(model(_prepare(chunk, device, mean)), dim=1).cpu() for chunk in x.split(batch_size)]
    return torch.cat(out)


def _len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
