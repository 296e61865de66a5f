"""One builder for the 2012-2015 "conv stack + fully connected head" networks.

The papers describe these networks as tables, one column (or row) per layer: filters x size,
stride, padding, then "LRN" and "x2 pool" annotations. ``Conv`` is one such cell, and a model file
is a table of ``Conv`` cells that reads like the paper's; ``conv_stack`` turns it into layers with
the papers' names (``conv1``, ``relu1``, ``norm1``, ``pool1``, ...) and ``fc_head`` adds
``fc6``..``fc8`` with the first FC layer's width read off the feature map at the native input size
(no adaptive pooling: the head depends on the input size, as in the papers).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.layers import LocalResponseNorm

LRN_ORDERS = ("norm_pool", "pool_norm")
POOL_MODES = ("floor", "ceil")


@dataclass(frozen=True)
class Conv:
    """One convolutional layer of a paper's table: ``out`` filters of ``kernel`` x ``kernel``.

    ``lrn``: local response normalisation after the ReLU; ``pool``: max pooling (kernel, stride)
    after it, e.g. ``(3, 2)`` for the overlapping 3x3/2 pooling of AlexNet.
    """

    out: int
    kernel: int
    stride: int = 1
    pad: int = 0
    groups: int = 1
    lrn: bool = False
    pool: tuple[int, int] | None = None


def lrn_factory(convention: str = "paper", size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                k: float = 2.0) -> Callable[[], nn.Module]:
    """LRN with constants given in the paper's convention (alpha per neighbour, Krizhevsky 2012).

    ``convention="caffe"`` builds the layer as Caffe (and ``torch.nn.LocalResponseNorm``) would read
    the *same numbers*: alpha divided by ``size``, i.e. ``size`` times weaker. That is what the
    BVLC reference models do with the AlexNet paper's alpha = 1e-4.
    """
    return lambda: LocalResponseNorm(size, alpha, beta, k, convention=convention)


def conv_stack(table: Sequence[Conv], in_chans: int = 3, *, pooling: str = "floor",
               lrn: Callable[[], nn.Module] | None = None, lrn_order: str = "norm_pool",
               first: int = 1) -> nn.Sequential:
    """``conv{i}`` -> ``relu{i}`` [-> ``norm{i}``] [-> ``pool{i}``] for each ``Conv`` of ``table``.

    ``lrn_order="pool_norm"`` swaps LRN and pooling (CaffeNet's order; the AlexNet paper normalises
    first). ``pooling="ceil"`` is Caffe's output-size rule: ceil((n - k) / s) + 1 instead of floor.
    ReLUs work in place, as in the reference implementations (less memory, a few % faster on CPU);
    ``extract_features`` copies the outputs it keeps, so ``conv5`` is still the pre-ReLU map.
    """
    if pooling not in POOL_MODES:
        raise ConfigError(f"pooling must be one of {POOL_MODES}, got {pooling!r}")
    if lrn_order not in LRN_ORDERS:
        raise ConfigError(f"lrn_order must be one of {LRN_ORDERS}, got {lrn_order!r}")
    lrn = lrn or lrn_factory()
    seq = nn.Sequential()
    c = in_chans
    for i, spec in enumerate(table, start=first):
        conv = nn.Conv2d(c, spec.out, spec.kernel, spec.stride, spec.pad, groups=spec.groups)
        seq.add_module(f"conv{i}", conv)
        seq.add_module(f"relu{i}", nn.ReLU(inplace=True))
        after = []
        if spec.lrn:
            after.append((f"norm{i}", lrn()))
        if spec.pool:
            k, s = spec.pool
            after.append((f"pool{i}", nn.MaxPool2d(k, s, ceil_mode=pooling == "ceil")))
        if lrn_order == "pool_norm":
            after.reverse()
        for name, m in after:
            seq.add_module(name, m)
        c = spec.out
    return seq


def feature_shape(features: nn.Module, input_size: Sequence[int]) -> tuple[int, ...]:
    """Output shape (C, H, W) of ``features`` for one image of ``input_size``, computed on ``meta``."""
    meta = copy.deepcopy(features).to("meta")
    with torch.no_grad():
        out = meta(torch.zeros(1, *input_size, device="meta"))
    if min(out.shape[2:], default=1) < 1:
        raise ConfigError(f"input {tuple(input_size)} is too small for this network")
    return tuple(out.shape[1:])


def fc_head(in_features: int, widths: Sequence[int], num_classes: int, dropout: float = 0.5,
            first: int = 6) -> nn.Sequential:
    """``flatten`` -> ``fc{first}`` -> ``relu`` -> ``drop`` ... -> ``fc{last}`` with ``num_classes``.

    Dropout follows each hidden FC layer, as in Krizhevsky et al. 2012 and the networks after it.
    """
    seq = nn.Sequential()
    seq.add_module("flatten", nn.Flatten())
    n = in_features
    for i, width in enumerate(widths, start=first):
        seq.add_module(f"fc{i}", nn.Linear(n, width))
        seq.add_module(f"relu{i}", nn.ReLU(inplace=True))
        if dropout > 0:
            seq.add_module(f"drop{i}", nn.Dropout(dropout))
        n = width
    seq.add_module(f"fc{first + len(widths)}", nn.Linear(n, num_classes))
    return seq


def flat_size(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
