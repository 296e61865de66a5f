"""The dense net's loss (Li, Zhao, Wang arXiv:1412.4526): cross-entropy over the pixels of a dense output,
optionally restricted to a mask of selected pixels (the paper's error-map mask).

With ``reduction="sum"`` the loss, and so its gradient, is exactly the sum of the per-patch losses of
the selected pixels: one forward and backward pass of the dense net does what patch-by-patch training
does with one pass per patch (tests/test_dense_train.py checks it in float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnkit.errors import ConfigError

IGNORE_INDEX = -100  # torch's cross-entropy default: unlabelled pixels


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
