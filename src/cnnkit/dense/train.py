"""Training a patch classifier densely (Li, Zhao, Wang arXiv:1412.4526) or from sampled patches.

Dense training: the loss over the dense output at the labelled pixels (optionally only a mask of
selected pixels, the paper's error map) has, in one forward and backward pass per image, the
gradient that patch-by-patch training would sum over those pixels' patches. The dense net shares
the patch classifier's parameters, so the optimiser simply holds ``model.parameters()``.
Dropout and BatchNorm act as in eval mode in the dense net (per-patch dropout masks and batch
statistics have no dense equivalent); patch training uses train mode.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cnnkit.data.segmentation import IGNORE_INDEX, SegmentationSample
from cnnkit.dense.net import densify
from cnnkit.dense.tiling import pad_image
from cnnkit.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)


def dense_loss(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *,
               ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
               class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over the pixels of a dense output.

    scores (N, K, *L) logits (or log-probabilities); target (N, *L) class indices, ``ignore_index``
    where unlabelled; mask (N, *L) or (*L): 1 for the pixels to train on (the paper's error-map
    mask), 0 elsewhere. ``reduction="sum"`` gives exactly the sum of the per-patch losses.
    """
    if target.shape != scores.shape[:1] + scores.shape[2:]:
        raise ConfigError(f"target of shape {tuple(target.shape)} does not match scores "
                          f"{tuple(scores.shape)}; it must be N x H x W")
    per_pixel = F.cross_entropy(scores, target.long(), weight=class_weight, ignore_index=ignore_index,
                                reduction="none")  # (N, *L), 0 at ignored pixels
    valid = target != ignore_index
    if mask is not None:
        if mask.shape != target.shape and mask.shape != target.shape[1:]:
            raise ConfigError(f"mask of shape {tuple(mask.shape)} does not match the image "
                              f"{tuple(target.shape)}; it must be H x W or N x H x W")
        valid = valid & mask.bool().expand_as(valid)
        per_pixel = per_pixel * valid
    total = per_pixel.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return total / valid.sum().clamp_min(1)


def sample_pixel_mask(target: torch.Tensor, count: int, *, balanced: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """A mask of ``count`` labelled pixels of ``target`` (any shape), equal numbers per class
    present when ``balanced`` (vessels are 9% of a retina image), drawn without replacement."""
    flat = target.reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=target.device)
    labelled = flat != IGNORE_INDEX
    groups = [flat == c for c in flat[labelled].unique()] if balanced else [labelled]
    per_group = max(1, count // max(1, len(groups)))
    for g in groups:
        idx = g.nonzero().squeeze(1)
        if idx.numel() > per_group:
            pick = torch.randperm(idx.numel(), generator=generator, device="cpu")[:per_group]
            idx = idx[pick.to(idx.device)]
        mask[idx] = True
    return mask.view_as(target)


def _extract_patches(image: torch.Tensor, positions: torch.Tensor, patch: int, border: str) -> torch.Tensor:
    """(C, H, W) image, (M, 2) positions -> (M, C, P, P) patches, same centring as densify."""
    xp = pad_image(image[None], (patch, patch), border)[0]
    view = xp.unfold(1, patch, 1).unfold(2, patch, 1)  # (C, H, W, P, P), a view
    return view[:, positions[:, 0], positions[:, 1]].permute(1, 0, 2, 3).contiguous()


@dataclass
class TrainConfig:
    mode: str = "dense"  # "dense" (whole-image loss) or "patches" (sampled patches)
    epochs: int = 10
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    weight_decay: float = 0.0
    pixels_per_image: int = 0  # dense: size of the error-map mask per image and step; 0 = all pixels
    images_per_step: int = 1  # dense: images of one size stacked into a batch
    balanced: bool = True  # class-balanced pixel/patch sampling
    batch_size: int = 128  # patches: patches per step
    steps_per_epoch: int = 0  # patches: 0 = one step per image
    border: str = "reflect"
    seed: int = 0
    max_memory: int | None = None


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; use adam or sgd")


def train_patch_classifier(model: nn.Module, patch: int, samples: Sequence[SegmentationSample],
                           cfg: TrainConfig, *, progress: bool = False) -> list[dict]:
    """Train ``model`` (patch -> class scores) on segmentation samples; returns per-epoch stats."""
    if cfg.mode not in ("dense", "patches"):
        raise ConfigError(f"unknown training mode {cfg.mode!r}; use dense or patches")
    if not samples:
        raise ConfigError("no training images")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    dense = densify(model, patch, border=cfg.border) if cfg.mode == "dense" else None
    history = []
    bar = tqdm(range(cfg.epochs), desc=f"train ({cfg.mode})", unit="epoch",
               disable=not (progress and sys.stderr.isatty()))
    for epoch in bar:
        total, count = 0.0, 0
        order = torch.randperm(len(samples), generator=gen).tolist()
        if cfg.mode == "dense":
            steps = _batches(order, samples, cfg.images_per_step)
        else:
            steps = range(cfg.steps_per_epoch or len(samples))
        for step in steps:
            if cfg.mode == "dense":
                loss = _dense_step(dense, [samples[i] for i in step], cfg, gen, device)
            else:
                loss = _patch_step(model, patch, samples, cfg, gen, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not math.isfinite(loss.item()):
                raise TrainingError(f"loss became {loss.item()} in epoch {epoch + 1}; lower --lr")
            total += loss.item()
            count += 1
        history.append({"epoch": epoch + 1, "loss": total / max(count, 1)})
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        log.info("epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, history[-1]["loss"])
    model.eval()
    return history


def _batches(order: list[int], samples, size: int) -> list[list[int]]:
    """Consecutive images of the same size, up to ``size`` per step (one pass per batch)."""
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < size and samples[out[-1][0]].image.shape == samples[i].image.shape:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _dense_step(dense, batch: list[SegmentationSample], cfg: TrainConfig, gen, device) -> torch.Tensor:
    image = torch.stack([s.image for s in batch]).to(device)  # (B, C, H, W)
    target = torch.stack([s.target for s in batch]).to(device)  # (B, H, W)
    mask = None
    if cfg.pixels_per_image:
        mask = sample_pixel_mask(target, cfg.pixels_per_image, balanced=cfg.balanced, generator=gen)
    scores = dense(image)  # (B, K, H, W)
    return dense_loss(scores, target, mask)


def _patch_step(model, patch, samples, cfg: TrainConfig, gen, device) -> torch.Tensor:
    """One step on ``batch_size`` patches drawn from random images (balanced by class)."""
    model.train()
    picks = torch.randint(len(samples), (cfg.batch_size,), generator=gen).tolist()
    patches, labels = [], []
    for i in sorted(set(picks)):
        s = samples[i]
        n = picks.count(i)
        mask = sample_pixel_mask(s.target, n, balanced=cfg.balanced, generator=gen)
        pos = mask.nonzero()  # (M, 2)
        patches.append(_extract_patches(s.image, pos, patch, cfg.border))
        labels.append(s.target[pos[:, 0], pos[:, 1]])
    x = torch.cat(patches).to(device)
    y = torch.cat(labels).to(device)
    out = model(x)
    return F.cross_entropy(out.reshape(out.shape[0], -1), y)


@torch.no_grad()
def predict_probabilities(model: nn.Module, patch: int, image: torch.Tensor, *, border: str = "reflect",
                          max_memory: int | None = None, dense=None) -> torch.Tensor:
    """Class probabilities (N, K, H, W) for images (N, C, H, W), in one dense pass."""
    model.eval()
    dense = dense or densify(model, patch, border=border, max_memory=max_memory)
    return torch.softmax(dense(image), dim=1)
