"""Locally connected layers: sparse connectivity without (or with only local) weight sharing.

The lecture: "In some applications (especially images with regular structures), we may only locally
share weights or not share weights at top layers" (e.g. aligned faces: Huang, Lee, Learned-Miller,
CVPR 2012; DeepFace, Taigman et al., CVPR 2014).

* :class:`LocallyConnected1d` / :class:`LocallyConnected2d` - every output location ``l`` has its
  own filter: ``y[b, o, l] = sum_{c, m} W[l, o, c, m] * x[b, c, l*s + m*d - p] + bias[o, l]``
  (correlation, as ``nn.Conv2d``). The input size is fixed at construction because the number of
  filters depends on it. Implementation: ``F.unfold`` (im2col, the same memory as a convolution's)
  and one batched matrix product over locations; weights ``(L, out_channels, in_channels*k_h*k_w)``.
* :class:`TiledConv1d` / :class:`TiledConv2d` - locally shared weights, two definitions:

  - ``regions=(R_h, R_w)``: the output grid is split into ``R_h x R_w`` rectangular regions of
    (nearly) equal size, as ``numpy.array_split`` splits an axis (the first ``n % R`` bands get one
    extra row); every output location of region ``(a, b)`` uses kernel ``W[a, b]``. One ordinary
    convolution per region on the input crop that region sees.
  - ``tile_size=(t_h, t_w)``: Ngiam et al., "Tiled convolutional neural networks", NIPS 2010: units
    ``t`` apart share weights, so location ``(i, j)`` uses kernel ``W[i % t_h, j % t_w]``
    (``t = 1`` is a convolution, ``t >= output size`` is locally connected). One strided
    convolution (stride ``s * t``) per kernel, interleaved back.

  Weights ``(R_h, R_w, out_channels, in_channels, k_h, k_w)`` and a bias per region or tile.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.layers._common import (
    IntOrTuple,
    as_tuple,
    check_input,
    check_window_fits,
    effective_kernel,
    out_size,
)


def _positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def _init_uniform_(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    """``nn.Conv2d``'s default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and bias."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


class _LocallyConnectedNd(nn.Module):
    spatial_dims = 2

    def __init__(self, in_channels: int, out_channels: int, input_size: IntOrTuple,
                 kernel_size: IntOrTuple, stride: IntOrTuple = 1, padding: IntOrTuple = 0,
                 dilation: IntOrTuple = 1, bias: bool = True):
        super().__init__()
        n, name = self.spatial_dims, type(self).__name__
        self.in_channels = _positive_int(in_channels, f"{name} in_channels")
        self.out_channels = _positive_int(out_channels, f"{name} out_channels")
        self.input_size = as_tuple(input_size, n, f"{name} input_size")
        self.kernel_size = as_tuple(kernel_size, n, f"{name} kernel_size")
        self.stride = as_tuple(stride, n, f"{name} stride")
        self.padding = as_tuple(padding, n, f"{name} padding", minimum=0)
        self.dilation = as_tuple(dilation, n, f"{name} dilation")
        check_window_fits(self.input_size, self.kernel_size, self.padding, self.dilation, name)
        self.output_size = tuple(out_size(*a) for a in zip(self.input_size, self.kernel_size, self.stride,
                                                             self.padding, self.dilation))
        n_loc, fan_in = math.prod(self.output_size), in_channels * math.prod(self.kernel_size)
        self.weight = nn.Parameter(torch.empty(n_loc, out_channels, fan_in))  # (L, O, C*k_h*k_w)
        self.bias = nn.Parameter(torch.empty(out_channels, *self.output_size)) if bias else None
        _init_uniform_(self.weight, self.bias, fan_in)

    def _as_2d(self, t: tuple[int, ...], fill: int) -> tuple[int, int]:
        return t if self.spatial_dims == 2 else (fill, *t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        check_input(x, self.spatial_dims, name, self.in_channels)
        if tuple(x.shape[2:]) != self.input_size:
            raise ConfigError(f"{name} was built for input size {self.input_size}, got {tuple(x.shape[2:])}; "
                              f"locally connected layers have one filter per location, so the size is fixed")
        x2 = x if self.spatial_dims == 2 else x.unsqueeze(2)  # a length-L map is a 1 x L image
        cols = F.unfold(x2, self._as_2d(self.kernel_size, 1), self._as_2d(self.dilation, 1),
                        self._as_2d(self.padding, 0), self._as_2d(self.stride, 1))  # (B, C*k_h*k_w, L)
        # One (B x K) @ (K x O) product per location, as a single bmm over contiguous location
        # batches (einsum picks a strided layout here that is ~5x slower on CPU).
        y = torch.bmm(cols.permute(2, 0, 1).contiguous(), self.weight.transpose(1, 2))  # (L, B, O)
        y = y.permute(1, 2, 0).reshape(x.shape[0], self.out_channels, *self.output_size)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, input_size={self.input_size}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, bias={self.bias is not None}")


class LocallyConnected1d(_LocallyConnectedNd):
    """A filter per output position of a (B, C, L) map; arguments as ``nn.Conv1d`` plus ``input_size``."""

    spatial_dims = 1


class LocallyConnected2d(_LocallyConnectedNd):
    """A filter per output location of a (B, C, H, W) map; arguments as ``nn.Conv2d`` plus ``input_size``."""

    spatial_dims = 2


def _array_split_bounds(n: int, parts: int) -> list[int]:
    """Boundaries of ``numpy.array_split(range(n), parts)``: the first ``n % parts`` parts are one longer."""
    sizes = [n // parts + (i < n % parts) for i in range(parts)]
    return [sum(sizes[:i]) for i in range(parts + 1)]


class _TiledConvNd(nn.Module):
    spatial_dims = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, *,
                 regions: IntOrTuple | None = None, tile_size: IntOrTuple | None = None,
                 stride: IntOrTuple = 1, padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                 bias: bool = True):
        super().__init__()
        n, name = self.spatial_dims, type(self).__name__
        if (regions is None) == (tile_size is None):
            raise ConfigError(f"{name}: give exactly one of regions=(R_h, R_w) or tile_size=(t_h, t_w)")
        self.in_channels = _positive_int(in_channels, f"{name} in_channels")
        self.out_channels = _positive_int(out_channels, f"{name} out_channels")
        self.kernel_size = as_tuple(kernel_size, n, f"{name} kernel_size")
        self.stride = as_tuple(stride, n, f"{name} stride")
        self.padding = as_tuple(padding, n, f"{name} padding", minimum=0)
        self.dilation = as_tuple(dilation, n, f"{name} dilation")
        self.mode = "regions" if regions is not None else "tiles"
        self.grid = as_tuple(regions if regions is not None else tile_size, n,
                             f"{name} {'regions' if regions is not None else 'tile_size'}")
        fan_in = in_channels * math.prod(self.kernel_size)
        self.weight = nn.Parameter(torch.empty(*self.grid, out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(*self.grid, out_channels)) if bias else None
        _init_uniform_(self.weight, self.bias, fan_in)

    def _as_2d(self, t: tuple[int, ...], fill: int) -> tuple[int, int]:
        return t if self.spatial_dims == 2 else (fill, *t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        check_input(x, self.spatial_dims, name, self.in_channels)
        check_window_fits(x.shape[2:], self.kernel_size, self.padding, self.dilation, name)
        x2 = x if self.spatial_dims == 2 else x.unsqueeze(2)  # a length-L map is a 1 x L image
        k, s, p, d = (self._as_2d(self.kernel_size, 1), self._as_2d(self.stride, 1),
                      self._as_2d(self.padding, 0), self._as_2d(self.dilation, 1))
        grid = self._as_2d(self.grid, 1)
        # (G_h, G_w, O, C, k_h, k_w)
        weight = self.weight.view(*grid, self.out_channels, self.in_channels, *k)
        bias = None if self.bias is None else self.bias.view(*grid, self.out_channels)
        out = [out_size(L, ki, si, pi, di) for L, ki, si, pi, di in zip(x2.shape[2:], k, s, p, d)]
        if any(o < g for o, g in zip(out, grid)):
            raise ConfigError(f"{name}: output size {tuple(out)} is smaller than the {self.mode} grid "
                              f"{grid}; use fewer {self.mode} or a larger input")
        xp = F.pad(x2, (p[1], p[1], p[0], p[0]))
        run = self._regions if self.mode == "regions" else self._tiles
        y = run(xp, weight, bias, k, s, d, out, grid)  # (B, O, out_h, out_w)
        return y if self.spatial_dims == 2 else y.squeeze(2)

    @staticmethod
    def _regions(xp, weight, bias, k, s, d, out, grid):
        rows, cols = _array_split_bounds(out[0], grid[0]), _array_split_bounds(out[1], grid[1])
        bands = []
        for a in range(grid[0]):
            # Output rows [r0, r1) read padded input rows [r0*s, (r1-1)*s + span).
            r0, r1 = rows[a], rows[a + 1]
            x_rows = xp[..., r0 * s[0]: (r1 - 1) * s[0] + effective_kernel(k[0], d[0]), :]
            blocks = []
            for b in range(grid[1]):
                c0, c1 = cols[b], cols[b + 1]
                crop = x_rows[..., c0 * s[1]: (c1 - 1) * s[1] + effective_kernel(k[1], d[1])]
                blocks.append(F.conv2d(crop, weight[a, b], None if bias is None else bias[a, b],
                                       stride=s, dilation=d))
            bands.append(torch.cat(blocks, dim=3))
        return torch.cat(bands, dim=2)

    @staticmethod
    def _tiles(xp, weight, bias, k, s, d, out, grid):
        B, O = xp.shape[0], weight.shape[2]
        y = xp.new_empty(B, O, *out)
        for a in range(grid[0]):
            for b in range(grid[1]):
                # Outputs (a + m*t_h, b + n*t_w) are a convolution with stride s*t starting at (a*s, b*s).
                part = F.conv2d(xp[..., a * s[0]:, b * s[1]:], weight[a, b],
                                None if bias is None else bias[a, b],
                                stride=(s[0] * grid[0], s[1] * grid[1]), dilation=d)
                y[..., a:: grid[0], b:: grid[1]] = part[..., : len(range(a, out[0], grid[0])),
                                                        : len(range(b, out[1], grid[1]))]
        return y

    def extra_repr(self) -> str:
        grid = f"regions={self.grid}" if self.mode == "regions" else f"tile_size={self.grid}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, {grid}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}")


class TiledConv1d(_TiledConvNd):
    """Locally shared weights on a (B, C, L) map: ``regions=R`` bands or ``tile_size=t`` (see module doc)."""

    spatial_dims = 1


class TiledConv2d(_TiledConvNd):
    """Locally shared weights on a (B, C, H, W) map: ``regions=(R_h, R_w)`` or ``tile_size`` (module doc)."""

    spatial_dims = 2
