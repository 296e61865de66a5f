"""The training engine: one epoch of SGD, and evaluation. Everything else (data, checkpoints, the run
folder) lives in ``cnnkit.train.runner``; the CLI only wires arguments.

A training step: batch to the device -> augmentation (drawn for the global batch, this process's
slice applied) -> mean-image subtraction -> forward under autocast -> loss (plus GoogLeNet's auxiliary
losses) -> backward (through a GradScaler for float16) -> optimizer step -> weight averaging.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cnnkit.data.augment import Transform, take
from cnnkit.errors import ConfigError, TrainingError
from cnnkit.train.losses import softmax_cross_entropy, split_outputs, total_loss
from cnnkit.train.metrics import ClassificationMeter
from cnnkit.utils import kill_point

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def bar(iterable: Iterable, progress: bool | None, desc: str, total: int | None = None):
    """A progress bar on a terminal (or when ``progress``), nothing otherwise."""
    if total is None:
        total = _len(iterable)
    disable = not sys.stderr.isatty() if progress is None else not progress
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=disable, dynamic_ncols=True)


def autocast(device: torch.device, precision: str = "fp32"):
    """Mixed precision for the forward pass: nothing for fp32, else torch.autocast with bf16 or fp16."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def _prepare(x: torch.Tensor, device: torch.device, mean: torch.Tensor | None,
             channels_last: bool = False) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if mean is not None:
        x = x - mean  # the lecture's mean-image subtraction
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    num_classes: int,
    mean: torch.Tensor | None = None,
    loss_fn: LossFn = softmax_cross_entropy,
    epoch: int = 0,
    progress: bool | None = None,
    augment: Transform | None = None,
    generator: torch.Generator | None = None,
    layout: Sequence[tuple[int, int, int]] | None = None,
    world_size: int = 1,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    aux_weight: float = 0.3,
    averaged: torch.optim.swa_utils.AveragedModel | None = None,
    averaged_source: nn.Module | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Train for one pass over ``loader``; returns (loss/acc1/acc5, confusion matrix).

    ``layout`` gives for each batch its slice (lo, hi) of the global batch of n_global images (see
    ``cnnkit.train.distributed``); without it every batch is a whole global batch. ``augment`` draws its
    parameters from ``generator`` for the whole global batch. ``averaged`` (Polyak / EMA weights) is
    updated from ``averaged_source`` (default ``model``) after every step.
    """
    model.train()
    meter = ClassificationMeter(num_classes)
    if augment is not None and generator is None:
        generator = torch.Generator().manual_seed(0)
    steps = bar(loader, progress, f"epoch {epoch} train", total=_len(loader))
    for batch, (x, y) in enumerate(steps, start=1):
        lo, hi, n_global = layout[batch - 1] if layout is not None else (0, len(y), len(y))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment is not None:
            x = augment.apply(x, take(augment.draw(n_global, tuple(x.shape[1:]), generator), lo, hi))
        x = _prepare(x, device, mean, channels_last)
        with autocast(device, precision):
            scores, loss = total_loss(loss_fn, model(x), y, aux_weight)
        value = optimizer_step(loss, optimizer, epoch=epoch, batch=batch, n_local=len(y), n_global=n_global,
                               world_size=world_size, scaler=scaler)
        if averaged is not None:
            averaged.update_parameters(averaged_source if averaged_source is not None else model)
        meter.update(scores, y, value)
        steps.set_postfix(loss=f"{value:.4f}", refresh=False)
    return meter.all_reduce(device).result(), meter.confusion


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, epoch: int, batch: int,
                   n_local: int, n_global: int, world_size: int = 1,
                   scaler: torch.amp.GradScaler | None = None) -> float:
    """One SGD step on ``loss``, this process's mean over its ``n_local`` items of a global batch of
    ``n_global``; returns the loss value. Every task's training step ends here.

    A non-finite loss stops training with a TrainingError (no checkpoint of the diverged state is
    written). Under DDP, which averages gradients over processes, the loss is weighted by
    ``n_local * world_size / n_global`` so that the result is the gradient of the global batch's mean.
    """
    value = loss.item()
    if not math.isfinite(value):
        lr = optimizer.param_groups[0]["lr"]
        raise TrainingError(
            f"loss became {value} at epoch {epoch}, batch {batch}; lower the learning rate "
            f"(--lr, now {lr:g}) or check the data for NaN/inf values"
        )
    if world_size > 1:
        loss = loss * (n_local * world_size / n_global)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    kill_point("step")
    return value


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    num_classes: int,
    mean: torch.Tensor | None = None,
    loss_fn: LossFn = softmax_cross_entropy,
    progress: bool | None = None,
    desc: str = "evaluate",
    view: Transform | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> tuple[dict[str, float], torch.Tensor]:
    """Loss, top-1/top-5 accuracy and confusion matrix of ``model`` on ``loader`` (summed over processes).

    ``view`` is a deterministic transform such as the central crop, applied before the mean subtraction.
    """
    model.eval()
    meter = ClassificationMeter(num_classes)
    for x, y in bar(loader, progress, desc, total=_len(loader)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if view is not None:
            x = view(x, None)
        x = _prepare(x, device, mean, channels_last)
        with autocast(device, precision):
            scores = split_outputs(model(x))[0]
            loss = loss_fn(scores, y)
        meter.update(scores, y, loss.item())
    return meter.all_reduce(device).result(), meter.confusion


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, *, mean: torch.Tensor | None = None,
                  batch_size: int = 256) -> torch.Tensor:
    """Class posteriors (softmax) for a batch of images already at the model's input size."""
    model.eval()
    device = next(model.parameters()).device
    out = [F.softmax(split_outputs(model(_prepare(chunk, device, mean)))[0].float(), dim=1).cpu()
           for chunk in x.split(batch_size)]
    return torch.cat(out)


def _len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
