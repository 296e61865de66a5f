"""Test-time protocols of the lecture's papers, and model averaging.

- ``center``: one central crop of the input size (offsets floored, as Caffe).
- ``10crop``: the four corner crops and the central crop, and their horizontal reflections; the ten
  softmax outputs are averaged (Krizhevsky et al. NIPS 2012, Sec. 4.1; Chatfield et al. BMVC 2014).
- ``multiscale``: VGG's dense evaluation (Simonyan & Zisserman ICLR 2015, Sec. 3.2 and 4.2): the FC
  layers become convolutions, the whole image is rescaled isotropically so that its smaller side is Q,
  the class score map is averaged spatially, and the softmax posteriors are averaged over the scales Q
  and over horizontal flips.
- model averaging: the softmax posteriors of several models are averaged (Krizhevsky et al. 2012,
  Sec. 6; VGG Sec. 4.4 "ConvNet fusion"; the lecture's Clarifai slide).

Mean subtraction follows the views: a view of the model's input size has the stored mean image
subtracted; a whole rescaled image has the mean image resized to its size subtracted (for a mean of
constant planes, the per-channel mean of VGG, this is exact).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.train.losses import split_outputs
from cnnkit.train.metrics import ClassificationMeter

TTA_MODES = ("center", "10crop", "multiscale")


def center_offset(size: tuple[int, int], crop_size: tuple[int, int]) -> tuple[int, int]:
    return (size[0] - crop_size[0]) // 2, (size[1] - crop_size[1]) // 2


def ten_crop_offsets(size: tuple[int, int], crop_size: tuple[int, int]) -> list[tuple[int, int]]:
    """(top, left) of the crops: top-left, top-right, bottom-left, bottom-right, centre."""
    (h, w), (ch, cw) = size, crop_size
    if ch > h or cw > w:
        raise ConfigError(f"cannot cut {ch}x{cw} crops from {h}x{w} images; load them larger (--load-size)")
    return [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), center_offset(size, crop_size)]


def ten_crop(x: torch.Tensor, crop_size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, 10, C, h, w): the five crops of :func:`ten_crop_offsets`, then their mirrors."""
    five = [x[..., t : t + crop_size[0], l : l + crop_size[1]] for t, l in ten_crop_offsets(x.shape[-2:], crop_size)]
    views = torch.stack(five, dim=1)  # (B, 5, C, h, w)
    return torch.cat([views, views.flip(-1)], dim=1)


def smaller_side_size(size: tuple[int, int], q: int) -> tuple[int, int]:
    """(H, W) rescaled isotropically so that the smaller side is ``q`` (the other rounded half up)."""
    h, w = size
    s = min(h, w)
    return (q, math.floor(w * q / s + 0.5)) if h == s else (math.floor(h * q / s + 0.5), q)


def rescale(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def fully_convolutional_copy(model: nn.Module, input_size: tuple[int, int, int]) -> nn.Module:
    """The model with its FC layers as convolutions (the lecture's FC -> conv), for dense evaluation."""
    from cnnkit.models.base import ClassifierNet, fully_convolutional

    if type(model).to_fully_convolutional is ClassifierNet.to_fully_convolutional:
        return fully_convolutional(model, input_size)  # at the size it was trained at
    if hasattr(model, "to_fully_convolutional"):
        return model.to_fully_convolutional()
    raise ConfigError(f"multi-scale evaluation needs a model with to_fully_convolutional(); "
                      f"{type(model).__name__} has none (use --tta center or 10crop)")


def check_protocol(mode: str, scales, input_size, load_size, model: nn.Module | None = None) -> None:
    """Refuse a protocol that cannot run or would be meaningless, before any work is done."""
    if mode not in TTA_MODES:
        raise ConfigError(f"unknown test protocol {mode!r}; use one of {', '.join(TTA_MODES)}")
    if mode == "10crop" and tuple(load_size) == tuple(input_size):
        raise ConfigError(f"--tta 10crop needs images loaded larger than the {input_size[0]}x{input_size[1]} "
                          f"input (--load-size); otherwise all crops are the same view")
    if mode == "10crop":
        ten_crop_offsets(tuple(load_size), tuple(input_size))  # crops must fit
    if mode == "multiscale":
        if not scales:
            raise ConfigError("--tta multiscale needs --scales, e.g. --scales 256 384 512")
        if min(scales) < min(input_size):
            raise ConfigError(f"--scales {min(scales)} is smaller than the model's input side {min(input_size)}")
        if model is not None and not hasattr(model, "to_fully_convolutional"):
            raise ConfigError(f"multi-scale evaluation needs a model with to_fully_convolutional(); "
                              f"{type(model).__name__} has none (use --tta center or 10crop)")


class Predictor:
    """One model, its mean image and a test protocol: ``predictor(x)`` gives class posteriors (B, K).

    ``x`` is a batch of images in [0, 1] at the load size; ``mean`` (C, h, w) is at the model's input size.
    """

    def __init__(self, model: nn.Module, mean: torch.Tensor | None, input_size: tuple[int, int], *,
                 mode: str = "center", scales: Sequence[int] = (), flip: bool = True):
        if mode not in TTA_MODES:
            raise ConfigError(f"unknown test protocol {mode!r}; use one of {', '.join(TTA_MODES)}")
        if mode == "multiscale":
            check_protocol(mode, scales, input_size, input_size)
        self.model, self.mean, self.input_size = model.eval(), mean, tuple(input_size)
        self.mode, self.scales, self.flip = mode, tuple(int(q) for q in scales), flip
        self.device = next(model.parameters()).device
        if mode == "multiscale":
            channels = mean.shape[0] if mean is not None else _in_channels(model)
            self.fcn = fully_convolutional_copy(model, (channels, *self.input_size)).eval()

    def _subtract(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        return x - rescale(self.mean[None].to(x.device), tuple(x.shape[-2:]))[0]

    def _scores(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        scores = split_outputs(net(self._subtract(x)))[0]
        return scores.float().mean((2, 3)) if scores.dim() == 4 else scores.float()  # spatial average

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.mode == "center":
            (t, l), (h, w) = center_offset(x.shape[-2:], self.input_size), self.input_size
            return F.softmax(self._scores(self.model, x[..., t : t + h, l : l + w]), 1)
        if self.mode == "10crop":
            views = ten_crop(x, self.input_size)  # (B, 10, C, h, w)
            probs = F.softmax(self._scores(self.model, views.flatten(0, 1)), 1)  # (B*10, K)
            return probs.view(len(x), 10, -1).mean(1)
        total = 0
        for q in self.scales:
            xq = rescale(x, smaller_side_size(x.shape[-2:], q))
            total = total + F.softmax(self._scores(self.fcn, xq), 1)
            if self.flip:
                total = total + F.softmax(self._scores(self.fcn, xq.flip(-1)), 1)
        return total / (len(self.scales) * (2 if self.flip else 1))


def _in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ConfigError(f"cannot tell the input channels of {type(model).__name__}")


def average_posteriors(predictors: Sequence[Predictor], x: torch.Tensor) -> torch.Tensor:
    """Model averaging: the mean of the predictors' class posteriors (B, K)."""
    return sum(p(x).cpu() for p in predictors) / len(predictors)


@torch.no_grad()
def evaluate_predictors(predictors: Sequence[Predictor], loader: Iterable, num_classes: int,
                        device: torch.device | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """Loss (negative log of the averaged posterior of the true class), top-1/top-5 accuracy, confusion."""
    meter = ClassificationMeter(num_classes)
    for x, y in loader:
        probs = average_posteriors(predictors, x)
        y = y.cpu()
        nll = -torch.log(probs.gather(1, y[:, None]).clamp(min=1e-12)).mean()
        meter.update(probs, y, float(nll))
    if device is not None:
        meter.all_reduce(device)
    return meter.result(), meter.confusion
