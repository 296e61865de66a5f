"""Pooling: max and average over spatial windows (with dilation), and max over groups of feature maps.

The lecture's pooling layer partitions each feature map into (possibly overlapping) windows and
outputs their maximum or average; the number of maps is unchanged. Every window here is described
by ``kernel_size``, ``stride`` (default: the kernel size), ``padding``, ``dilation`` (taps ``d``
apart, the "d-regularly sparse" kernels of the dense converter, Li et al. arXiv:1412.4526) and
``ceil_mode``, with exactly PyTorch's meaning of each.

Average pooling with ``dilation > 1`` does not exist in PyTorch (pytorch/pytorch#14907). Here it is
computed exactly, as a sum divided by a count:

* the sum: a depthwise convolution of the zero-padded map with a constant dilated kernel (the
  fastest dilated window primitive on CPU and GPU); with stride 1 its backward is hand-written as
  another forward window sum (PyTorch's own CPU backward for it is several times slower);
* the count, per output position, is the number of taps that fall inside the padded map
  (``count_include_pad=True``) or inside the unpadded map (``False``). Taps of a ceil-mode window
  that hang beyond the right padding are never counted. With ``dilation=1`` these are PyTorch's
  divisors, and ``dilation=1`` simply calls ``F.avg_pool1d/2d``.

:class:`ChannelMaxPool` is the lecture's "pooling over the outputs of separately parameterised
convolutions" (Goodfellow et al., Deep Learning, ch. 9.3; maxout, Goodfellow et al. 2013): the max
over groups of consecutive feature maps at each position, which lets a layer learn which
transformations (e.g. rotations of a template) its response should be invariant to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.layers._common import (
    IntOrTuple,
    as_tuple,
    check_float,
    check_input,
    check_window_fits,
    effective_kernel,
    out_size,
)


def _pool_args(x: torch.Tensor, n: int, layer: str, kernel_size, stride, padding, dilation, ceil_mode):
    """Validate ``x`` and the window; return (kernel, stride, padding, dilation, output size)."""
    check_input(x, n, layer)
    k = as_tuple(kernel_size, n, f"{layer} kernel_size")
    s = k if stride is None else as_tuple(stride, n, f"{layer} stride")
    p = as_tuple(padding, n, f"{layer} padding", minimum=0)
    d = as_tuple(dilation, n, f"{layer} dilation")
    if any(pi > effective_kernel(ki, di) // 2 for pi, ki, di in zip(p, k, d)):
        raise ConfigError(f"{layer}: padding {p} must be at most half the (dilated) kernel {k}; "
                          f"more padding would create windows made only of padding")
    spatial = tuple(x.shape[2:])
    check_window_fits(spatial, k, p, d, layer)
    out = tuple(out_size(L, ki, si, pi, di, ceil_mode) for L, ki, si, pi, di in zip(spatial, k, s, p, d))
    return k, s, p, d, out


def max_pool(x: torch.Tensor, kernel_size: IntOrTuple, stride: IntOrTuple | None = None,
             padding: IntOrTuple = 0, dilation: IntOrTuple = 1, ceil_mode: bool = False,
             return_indices: bool = False):
    """Max pooling of a (B, C, L) or (B, C, H, W) map; PyTorch's kernel after argument checks."""
    n = x.dim() - 2 if x.dim() in (3, 4) else 2
    k, s, p, d, _ = _pool_args(x, n, f"MaxPool{n}d", kernel_size, stride, padding, dilation, ceil_mode)
    if any(pi > ki // 2 for pi, ki in zip(p, k)):  # PyTorch bounds it by the undilated kernel
        raise ConfigError(f"MaxPool{n}d: padding {p} must be at most half the kernel {k} (PyTorch's rule)")
    fn = F.max_pool1d if n == 1 else F.max_pool2d
    return fn(x, k, s, p, d, ceil_mode=ceil_mode, return_indices=return_indices)


def _axis_counts(size: int, n_out: int, k: int, s: int, p: int, d: int, include_pad: bool) -> list[int]:
    """Per output index: how many of the window's taps land in the padded (or unpadded) input."""
    lo, hi = (-p, size + p) if include_pad else (0, size)
    return [sum(lo <= o * s - p + i * d < hi for i in range(k)) for o in range(n_out)]


class _WindowSum(torch.autograd.Function):
    """``scale`` times the sum over every stride-1 dilated window of an already padded (B, C, H, W) map.

    Forward is a depthwise convolution with a constant kernel. Backward is its adjoint: each input
    pixel receives the (scaled) sum of the gradients of the windows that contain it, a full
    correlation of the gradient with the same constant kernel (it is its own flip), run as another
    forward convolution. That matters on CPU, where PyTorch's depthwise-convolution backward is
    several times slower than its forward (benchmarks/layers.py). Padding is explicit because
    oneDNN's fast depthwise kernel falls back to a slow one for padding of about half the kernel span
    or more. The backward is built from differentiable ops, so double backward works too.
    """

    @staticmethod
    def forward(ctx, x, kernel, dilation, scale):
        ctx.args = (kernel, dilation, scale)
        weight = x.new_full((x.shape[1], 1, *kernel), scale)
        return F.conv2d(x, weight, dilation=dilation, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):
        k, d, scale = ctx.args
        e = [effective_kernel(ki, di) - 1 for ki, di in zip(k, d)]
        weight = grad.new_full((grad.shape[1], 1, *k), scale)
        full = F.pad(grad, (e[1], e[1], e[0], e[0]))  # (B, C, H + e_h, W + e_w)
        return F.conv2d(full, weight, dilation=d, groups=grad.shape[1]), None, None, None


def _dilated_window_sums(x: torch.Tensor, k, s, p, d, out, scale: float) -> torch.Tensor:
    """``scale`` * sum of every dilated window of a (B, C, H, W) map with zero padding; (B, C, *out)."""
    # Pad p on the left and, on the right, as far as the last (possibly ceil-mode) window reaches.
    need = [(o - 1) * si + effective_kernel(ki, di) for o, si, ki, di in zip(out, s, k, d)]
    right = [max(pi, n_i - L - pi) for pi, n_i, L in zip(p, need, x.shape[2:])]
    if any(p) or any(right):
        x = F.pad(x, (p[1], right[1], p[0], right[0]))
    if s == (1, 1):  # the dense converter's case (every stride is 1 there): the fast adjoint
        sums = _WindowSum.apply(x, tuple(k), tuple(d), scale)
    else:  # strided: PyTorch's own backward measured as fast as a zero-stuffed adjoint
        sums = F.conv2d(x, x.new_full((x.shape[1], 1, *k), scale), stride=s, dilation=d, groups=x.shape[1])
    return sums[..., : out[0], : out[1]]


def avg_pool(x: torch.Tensor, kernel_size: IntOrTuple, stride: IntOrTuple | None = None,
             padding: IntOrTuple = 0, dilation: IntOrTuple = 1, ceil_mode: bool = False,
             count_include_pad: bool = True) -> torch.Tensor:
    """Average pooling of a (B, C, L) or (B, C, H, W) map, with dilation (see the module docstring)."""
    n = x.dim() - 2 if x.dim() in (3, 4) else 2
    layer = f"AvgPool{n}d"
    k, s, p, d, out = _pool_args(x, n, layer, kernel_size, stride, padding, dilation, ceil_mode)
    check_float(x, layer)
    if d == (1,) * n:
        fn = F.avg_pool1d if n == 1 else F.avg_pool2d
        return fn(x, k, s, p, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    return _sum_and_divide(x, k, s, p, d, out, count_include_pad, layer)


def _sum_and_divide(x: torch.Tensor, k, s, p, d, out, count_include_pad: bool, layer: str) -> torch.Tensor:
    """Window sums divided by tap counts; any dilation (with dilation 1 it reproduces F.avg_pool)."""
    n = x.dim() - 2
    if n == 1:  # a length-L map is a 1 x L image
        k, s, p, d, out = (1, *k), (1, *s), (0, *p), (1, *d), (1, *out)
        x = x.unsqueeze(2)
    # Every window counts all its k_h * k_w taps unless padding is excluded or a ceil-mode window
    # hangs past the padding; then the divisor is the outer product of per-axis tap counts.
    full = all((count_include_pad or pi == 0) and (o - 1) * si + effective_kernel(ki, di) <= L + 2 * pi
               for L, o, ki, si, pi, di in zip(x.shape[2:], out, k, s, p, d))
    if full:
        y = _dilated_window_sums(x, k, s, p, d, out, 1.0 / (k[0] * k[1]))  # (B, C, out_h, out_w)
    else:
        counts = [_axis_counts(L, o, ki, si, pi, di, count_include_pad)
                  for L, o, ki, si, pi, di in zip(x.shape[2:], out, k, s, p, d)]
        for axis, c in enumerate(counts[2 - n:]):
            if 0 in c:
                raise ConfigError(f"{layer}: output index {c.index(0)} along spatial axis {axis} has a "
                                  f"window made only of padding; use count_include_pad=True or less "
                                  f"padding/dilation")
        divisor = torch.outer(*(torch.tensor(c, dtype=x.dtype, device=x.device) for c in counts))
        y = _dilated_window_sums(x, k, s, p, d, out, 1.0) / divisor
    return y.squeeze(2) if n == 1 else y


class _PoolNd(nn.Module):
    spatial_dims = 2

    def __init__(self, kernel_size: IntOrTuple, stride: IntOrTuple | None = None, padding: IntOrTuple = 0,
                 dilation: IntOrTuple = 1, ceil_mode: bool = False):
        super().__init__()
        n, name = self.spatial_dims, type(self).__name__
        self.kernel_size = as_tuple(kernel_size, n, f"{name} kernel_size")
        self.stride = self.kernel_size if stride is None else as_tuple(stride, n, f"{name} stride")
        self.padding = as_tuple(padding, n, f"{name} padding", minimum=0)
        self.dilation = as_tuple(dilation, n, f"{name} dilation")
        self.ceil_mode = bool(ceil_mode)

    def _check(self, x: torch.Tensor) -> None:
        check_input(x, self.spatial_dims, type(self).__name__)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class _MaxPoolNd(_PoolNd):
    def __init__(self, *args, return_indices: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.return_indices = return_indices

    def forward(self, x: torch.Tensor):
        self._check(x)
        return max_pool(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                        self.return_indices)


class _AvgPoolNd(_PoolNd):
    def __init__(self, *args, count_include_pad: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return avg_pool(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                        self.count_include_pad)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, count_include_pad={self.count_include_pad}"


class MaxPool1d(_MaxPoolNd):
    """Max over windows of a (B, C, L) map; arguments as ``nn.MaxPool1d``."""

    spatial_dims = 1


class MaxPool2d(_MaxPoolNd):
    """Max over windows of a (B, C, H, W) map; arguments as ``nn.MaxPool2d``."""

    spatial_dims = 2


class AvgPool1d(_AvgPoolNd):
    """Average over windows of a (B, C, L) map, ``dilation`` included; as ``nn.AvgPool1d`` otherwise."""

    spatial_dims = 1


class AvgPool2d(_AvgPoolNd):
    """Average over windows of a (B, C, H, W) map, ``dilation`` included; as ``nn.AvgPool2d`` otherwise."""

    spatial_dims = 2


def channel_max_pool(x: torch.Tensor, group_size: int, return_indices: bool = False):
    """Max over groups of ``group_size`` consecutive channels at each position: (B, C, *S) -> (B, C/g, *S).

    Group ``j`` holds channels ``j*g .. j*g + g - 1``. The gradient goes to the channel that won (the
    first one on ties), as for spatial max pooling.
    """
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ConfigError(f"ChannelMaxPool group_size must be a positive int, got {group_size!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"ChannelMaxPool expects (B, C, ...) input, got {shape}")
    B, C = x.shape[:2]
    if C % group_size:
        raise ConfigError(f"ChannelMaxPool: {C} channels are not divisible by group_size {group_size}; "
                          f"use a number of filters that is a multiple of the group size")
    values, indices = x.reshape(B, C // group_size, group_size, *x.shape[2:]).max(dim=2)  # (B, C/g, *S)
    return (values, indices) if return_indices else values


class ChannelMaxPool(nn.Module):
    """Max over groups of ``group_size`` consecutive feature maps, per pixel (learned invariance).

    With the filters of a group set (or learned) to be transformed copies of one template, e.g. its
    rotations, the pooled unit responds to the template in any of those transformations.
    """

    def __init__(self, group_size: int, return_indices: bool = False):
        super().__init__()
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ConfigError(f"ChannelMaxPool group_size must be a positive int, got {group_size!r}")
        self.group_size, self.return_indices = group_size, return_indices

    def forward(self, x: torch.Tensor):
        return channel_max_pool(x, self.group_size, self.return_indices)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"
