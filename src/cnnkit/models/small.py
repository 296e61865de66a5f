"""A small configurable CNN for the lecture's studies (transfer, retrieval, ablations).

The lecture's "Investigate components of CNNs" (after Chatfield et al., "Return of the Devil in the
Details", BMVC 2014, and Zeiler & Fergus's Clarifai study) varies kernel size, number of channels,
stride, the width of the fully connected layers and model averaging over random initialisations.
``small_cnn`` exposes exactly those knobs on a network small enough to train in seconds on a CPU:

    conv1 (k x k, stride s) - relu1 - pool1 (2x2 max) - conv2 (k x k) - relu2 - pool2 - ...
    flatten - fc{n} - relu{n} [- drop{n}] - ... - fc{L} (the class scores)

Layers are numbered in order over the whole net (conv1, conv2, fc3, fc4 by default), so "the first
n layers" of Yosinski et al. (NIPS 2014) is well defined. The stride applies to conv1 only, as in
the Chatfield/Clarifai first-layer variants; later convolutions have stride 1. Convolutions are
unpadded by default, which keeps the fully convolutional form exact for dense prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.models.base import ClassifierNet
from cnnkit.models.registry import register_model

INPUT = 32  # native input side (digits are upsampled 8 -> 32 by the data loader)


def _as_tuple(value, name: str) -> tuple[int, ...]:
    values = (value,) if isinstance(value, int) else tuple(value)
    if not values or any(not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"small_cnn option {name}={value!r} must be a positive integer or a list of them")
    return values


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@register_model(
    "small_cnn",
    paper="Configurable study net after Chatfield, Simonyan, Vedaldi, Zisserman. Return of the Devil in the "
    "Details: Delving Deep into Convolutional Nets. BMVC 2014",
    input_size=(1, INPUT, INPUT),
    num_classes=10,
    pooling="floor",
    normalisation="none",
    reference_params=65_162,  # with the default options (our own study net: no paper figure)
    notes="conv-relu-maxpool blocks then ReLU FC layers; kernel_size, channels, stride (conv1), padding, "
    "fc_width, dropout, init_seed are options",
)
def small_cnn(num_classes: int = 10, in_chans: int = 1, kernel_size: int = 5, channels: int | Sequence[int] = (16, 32),
              stride: int = 1, padding: int = 0, fc_width: int | Sequence[int] = 64, dropout: float = 0.0,
              init_seed: int | None = None) -> ClassifierNet:
    """``channels``: an int c gives two conv blocks (c, 2c); a list gives one block per entry.
    ``fc_width``: an int or a list, one hidden FC layer per entry (an empty list: none).
    ``init_seed``: seed of the initial weights only (the global RNG is left untouched), so that the
    members of a model average differ in their random initialisation and nothing else.
    """
    widths = (channels, 2 * channels) if isinstance(channels, int) else channels
    widths = _as_tuple(widths, "channels")
    hidden = () if isinstance(fc_width, Sequence) and len(fc_width) == 0 else _as_tuple(fc_width, "fc_width")
    for name, value in (("kernel_size", kernel_size), ("stride", stride)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"small_cnn option {name}={value!r} must be a positive integer")
    if not isinstance(padding, int) or padding < 0:
        raise ConfigError(f"small_cnn option padding={padding!r} must be a non-negative integer")
    if not 0 <= dropout < 1:
        raise ConfigError(f"small_cnn option dropout={dropout!r} must be in [0, 1)")

    with torch.random.fork_rng(devices=[], enabled=init_seed is not None):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        return _build(num_classes, in_chans, kernel_size, widths, stride, padding, hidden, dropout)


def _build(num_classes, in_chans, kernel_size, widths, stride, padding, hidden, dropout) -> ClassifierNet:
    features = nn.Sequential()
    size, prev = INPUT, in_chans
    for i, width in enumerate(widths, start=1):
        s = stride if i == 1 else 1
        size = _conv_out(size, kernel_size, s, padding)
        features.add_module(f"conv{i}", nn.Conv2d(prev, width, kernel_size, stride=s, padding=padding))
        # not in place: a hook on conv{i} (extract_features) must keep seeing the pre-activation
        features.add_module(f"relu{i}", nn.ReLU())
        size //= 2
        features.add_module(f"pool{i}", nn.MaxPool2d(2))
        if size < 1:
            raise ConfigError(f"small_cnn with kernel_size={kernel_size}, stride={stride}, padding={padding} and "
                              f"{len(widths)} conv blocks shrinks a {INPUT}x{INPUT} input to nothing at conv{i}; "
                              f"use a smaller kernel or stride, padding, or fewer channels entries")
        prev = width
    classifier = nn.Sequential()
    classifier.add_module("flatten", nn.Flatten())
    flat = prev * size * size  # (B, C, M, M) -> (B, C*M*M)
    index = len(widths) + 1
    for width in hidden:
        classifier.add_module(f"fc{index}", nn.Linear(flat, width))
        classifier.add_module(f"relu{index}", nn.ReLU())
        if dropout > 0:
            classifier.add_module(f"drop{index}", nn.Dropout(dropout))
        flat, index = width, index + 1
    classifier.add_module(f"fc{index}", nn.Linear(flat, num_classes))
    return ClassifierNet(features, classifier, (in_chans, INPUT, INPUT))
