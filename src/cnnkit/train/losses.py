"""Losses and heads of the lecture's training recipes.

- ``softmax``: softmax regression (cross-entropy), as AlexNet, VGG and GoogLeNet.
- ``ranking-hinge``: Chatfield et al. (BMVC 2014, Sec. 3.2) replace the softmax loss by a ranking hinge
  loss when fine-tuning on VOC: for every class c, a positive image must score higher than a negative
  one by a margin, ``w_c phi(I_pos) > w_c phi(I_neg) + 1 - xi`` with slack xi >= 0. Minimising the
  slacks gives the pairwise hinge ``max(0, 1 - s_c(I_pos) + s_c(I_neg))``; we average it over every
  (positive, negative) pair of the mini-batch and over the classes that have both. This is a ranking
  of images per class (what average precision measures), not Crammer-Singer's ranking of classes per
  image. Targets are class indices (B,) or multi-label 0/1 matrices (B, K).
- GoogLeNet's auxiliary classifiers (Szegedy et al. CVPR 2015, Sec. 5): a model that returns
  ``(main, aux1, aux2)`` is trained on ``loss(main) + 0.3 * (loss(aux1) + loss(aux2))``.
- L2-normalised features (Chatfield et al. 2014: "L2 normalising features" is worth ~5% mAP on VOC
  2007): :func:`l2_normalize_head_input` makes the last layer read phi / ||phi||.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ConfigError

LOSSES = ("softmax", "ranking-hinge")


def _full(scores: torch.Tensor) -> torch.Tensor:
    """Half-precision scores (autocast) in float32 for the loss; float32 and float64 as they are."""
    return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores


def softmax_cross_entropy(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of softmax(scores); multi-label targets (B, K) are normalised to distributions."""
    scores = _full(scores)
    if target.dim() == 2:
        target = target.to(scores.dtype)
        target = target / target.sum(1, keepdim=True).clamp(min=1)
        return torch.sum(-target * F.log_softmax(scores, dim=1), dim=1).mean()
    return F.cross_entropy(scores, target)


def _positives(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    if target.dim() == 1:
        return F.one_hot(target, num_classes).bool()
    return target.bool()


def ranking_hinge_loss(scores: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Mean over classes of the mean pairwise hinge ``max(0, margin - s_c(pos) + s_c(neg))``.

    ``scores`` (B, K); ``target`` (B,) class indices or (B, K) 0/1. Classes without both a positive and
    a negative image in the batch do not contribute; a batch where no class has both gives 0.
    """
    scores = _full(scores)
    pos = _positives(target, scores.shape[1])  # (B, K)
    neg = ~pos
    # (B_pos, B_neg, K) pairwise margins, masked to real (positive, negative) pairs of each class
    hinge = (margin - scores[:, None, :] + scores[None, :, :]).clamp(min=0)
    pairs = pos[:, None, :] & neg[None, :, :]
    count = pairs.sum((0, 1))  # (K,)
    per_class = (hinge * pairs).sum((0, 1)) / count.clamp(min=1)
    valid = count > 0
    if not bool(valid.any()):
        return scores.sum() * 0  # keeps the graph: a zero gradient
    return per_class[valid].mean()


def make_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "softmax":
        return softmax_cross_entropy
    if name == "ranking-hinge":
        return ranking_hinge_loss
    raise ConfigError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")


def split_outputs(output) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(main scores, auxiliary scores) from a model output: a tensor, or GoogLeNet's (main, aux1, aux2)."""
    if isinstance(output, (tuple, list)):
        return output[0], tuple(output[1:])
    return output, ()


def total_loss(loss_fn, output, target: torch.Tensor, aux_weight: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """(main scores, loss): the main loss plus ``aux_weight`` times each auxiliary classifier's loss."""
    main, aux = split_outputs(output)
    loss = loss_fn(main, target)
    for scores in aux:
        loss = loss + aux_weight * loss_fn(scores, target)
    return main, loss


def last_layer(model: nn.Module) -> nn.Module:
    """The classifier's last Linear/Conv layer (``model.classifier`` when there is one)."""
    root = getattr(model, "classifier", model)
    layers = [m for m in root.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Linear or Conv2d layer to normalise the input of")
    return layers[-1]


def _normalize_input(_module, args):
    (x, *rest) = args
    return (F.normalize(x, p=2, dim=1), *rest)


def l2_normalize_head_input(model: nn.Module) -> nn.Module:
    """Make the last layer see L2-normalised features phi / ||phi|| (over channels, per position). In place."""
    layer = last_layer(model)
    if not getattr(layer, "_cnnkit_l2", False):
        layer.register_forward_pre_hook(_normalize_input)
        layer._cnnkit_l2 = True
    return model
