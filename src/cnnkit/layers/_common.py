"""Argument checks and size arithmetic shared by the layers.

Every check raises :class:`~cnnkit.errors.ConfigError` with a one-line message that names the
argument and says what would be valid, so that a user's mistake never surfaces as a shape error
deep inside PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cnnkit.errors import ConfigError

IntOrTuple = int | Sequence[int]


def as_tuple(value: IntOrTuple, n: int, name: str, *, minimum: int = 1) -> tuple[int, ...]:
    """``3 -> (3, 3)``; a sequence must have ``n`` entries; every entry must be an int >= ``minimum``."""
    items = (value,) * n if isinstance(value, int) else tuple(value)
    if len(items) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ConfigError(f"{name} must be an int or {n} ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ConfigError(f"{name} must be >= {minimum} in every dimension, got {value!r}")
    return items


def effective_kernel(kernel: int, dilation: int) -> int:
    """Span of a dilated kernel: ``k`` taps ``d`` apart cover ``(k - 1) * d + 1`` positions."""
    return (kernel - 1) * dilation + 1


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1,
             ceil_mode: bool = False) -> int:
    """Output length of a sliding window, with PyTorch's rule for ``ceil_mode``.

    In ceil mode a last, partial window is kept only if it starts inside the input or the left
    padding (never in the right padding), exactly as ``nn.MaxPool2d``/``nn.AvgPool2d`` do.
    """
    span = size + 2 * padding - effective_kernel(kernel, dilation)
    if span < 0:
        return 0
    if not ceil_mode:
        return span // stride + 1
    n = math.ceil(span / stride) + 1
    if (n - 1) * stride >= size + padding:
        n -= 1
    return n


def check_input(x: torch.Tensor, spatial_dims: int, layer: str, channels: int | None = None) -> None:
    """``x`` must be (B, C, *spatial) with ``spatial_dims`` spatial axes and, if given, ``channels``."""
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"{layer} expects a tensor, got {type(x).__name__}")
    if x.dim() != spatial_dims + 2:
        dims = "(B, C, L)" if spatial_dims == 1 else "(B, C, H, W)"
        raise ConfigError(f"{layer} expects a {spatial_dims + 2}-d input {dims}, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ConfigError(f"{layer} expects {channels} input channels, got {x.shape[1]} "
                          f"(input shape {tuple(x.shape)})")


def check_window_fits(spatial: Sequence[int], kernel: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], layer: str) -> None:
    """The (dilated) kernel must fit inside the padded input in every dimension."""
    for size, k, p, d in zip(spatial, kernel, padding, dilation):
        if effective_kernel(k, d) > size + 2 * p:
            raise ConfigError(f"{layer}: kernel {tuple(kernel)} (dilation {tuple(dilation)}) is larger "
                              f"than the padded input {tuple(spatial)} + 2*{tuple(padding)}; "
                              f"use a smaller kernel or a larger input")


def check_float(x: torch.Tensor, layer: str) -> None:
    if not x.is_floating_point():
        raise ConfigError(f"{layer} expects a floating-point input, got {x.dtype}; convert with x.float()")
