"""Backpropagation in a CNN, the lecture's equations ("BP on CNN") in NumPy, written to be read.

This is the slow, obviously correct twin of autograd: every layer loops over its output positions
and says in one line what it computes. It serves as a test oracle and as teaching material.

Notation, as in the lecture. A layer turns its input map ``x`` into weighted sums ``net`` and, after
a nonlinearity, into ``y = f(net)``. The *sensitivity* of a quantity is minus the derivative of the
loss with respect to it, ``delta = -dJ/dnet``; it is propagated from the output back to the input,
and the weight gradients are read off it.

Maps are NumPy arrays ``(N, C, L)`` (1D) or ``(N, C, H, W)`` (2D): a batch of ``N`` inputs with ``C``
feature maps. The same code serves both: a *window* is a tuple of slices, one per spatial axis.

Convolution (the "downsampled convolution" with stride ``s``)::

    net[o, j] = sum_c sum_m w[o, c, m] * x[c, j*s + m] + b[o]

This is a correlation, as in every deep-learning library; the lecture's
``net_j = sum_m w_m x_{j-m}`` is the same with the filter flipped. Its sensitivities::

    dJ/dw[o, c, m] = -sum_j delta[o, j] * x[c, j*s + m]     (correlation of the sensitivity map
                                                              with the input map)
    dJ/db[o]       = -sum_j delta[o, j]
    delta_x[c, i]  =  sum_{o, j, m: j*s + m = i} w[o, c, m] * delta[o, j]
                                                             (as in a multilayer network, but
                                                              summed over every output that
                                                              shares the weight)

Activations ``y = f(net)``: ``delta_net = f'(net) * delta_y`` with ``tanh' = 1 - y^2`` and
``ReLU' = [net > 0]``.

Pooling has no weights to update. Max pooling records, during the forward pass, which input held
each window's maximum, and sends each output's sensitivity back to that input; where windows
overlap, an input can be the maximum of several windows and *the sensitivities are added*. Average
pooling spreads each output's sensitivity evenly, ``delta / window size``, over its window; with
overlapping windows the shares are again added.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from cnnkit.errors import ConfigError


def _windows(out_shape: Sequence[int], kernel: Sequence[int],
             stride: Sequence[int]) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """Every output position ``j`` with the window of input positions it sees, ``j*s .. j*s + k - 1``."""
    for j in np.ndindex(*out_shape):
        yield j, tuple(slice(ji * s, ji * s + k) for ji, s, k in zip(j, stride, kernel))


def _out_shape(in_shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int], layer: str) -> tuple:
    if any(k > n for k, n in zip(kernel, in_shape)):
        raise ConfigError(f"{layer}: kernel {tuple(kernel)} is larger than its input {tuple(in_shape)}")
    return tuple((n - k) // s + 1 for n, k, s in zip(in_shape, kernel, stride))


def _per_axis(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return (value,) * n if isinstance(value, int) else tuple(value)


@dataclass
class Conv:
    """Convolutional layer: ``weight`` (O, C, *k), ``bias`` (O,), stride and zero padding per axis."""

    weight: np.ndarray
    bias: np.ndarray
    stride: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] = 0
    grad_weight: np.ndarray | None = field(default=None, repr=False)  # dJ/dw after backward
    grad_bias: np.ndarray | None = field(default=None, repr=False)  # dJ/db after backward

    def forward(self, x: np.ndarray) -> np.ndarray:
        n = self.weight.ndim - 2
        self.kernel = self.weight.shape[2:]
        self.s, self.p = _per_axis(self.stride, n), _per_axis(self.padding, n)
        self.x = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in self.p])  # zero padding, kept for dJ/dw
        out_shape = _out_shape(self.x.shape[2:], self.kernel, self.s, "Conv")
        net = np.empty((x.shape[0], self.weight.shape[0], *out_shape))
        spatial = tuple(range(1, n + 2))  # the axes (c, m...) summed by the dot product
        for j, win in _windows(out_shape, self.kernel, self.s):
            # net[:, o, j] = sum_{c, m} w[o, c, m] * x[:, c, j*s + m] + b[o]
            net[(..., *j)] = np.tensordot(self.x[(slice(None), slice(None), *win)], self.weight,
                                          axes=(spatial, spatial)) + self.bias
        return net

    def backward(self, delta: np.ndarray) -> np.ndarray:
        """Take ``delta = -dJ/dnet``; store dJ/dw and dJ/db; return the input's sensitivity -dJ/dx."""
        self.grad_weight = np.zeros_like(self.weight)
        delta_x = np.zeros_like(self.x)
        for j, win in _windows(delta.shape[2:], self.kernel, self.s):
            d = delta[(..., *j)]  # (N, O): the sensitivity of output position j
            x_win = self.x[(slice(None), slice(None), *win)]  # (N, C, *k)
            # dJ/dw = -sum_j delta_j x_window(j): the correlation of the sensitivity and input maps
            self.grad_weight -= np.tensordot(d, x_win, axes=(0, 0))
            # every input in the window receives delta through the weight that connected it
            delta_x[(slice(None), slice(None), *win)] += np.tensordot(d, self.weight, axes=(1, 0))
        self.grad_bias = -delta.sum(axis=(0, *range(2, delta.ndim)))
        crop = tuple(slice(p, size - p) for p, size in zip(self.p, self.x.shape[2:]))
        return delta_x[(slice(None), slice(None), *crop)]  # padding positions are not inputs


@dataclass
class Tanh:
    def forward(self, net: np.ndarray) -> np.ndarray:
        self.y = np.tanh(net)
        return self.y

    def backward(self, delta: np.ndarray) -> np.ndarray:
        return delta * (1.0 - self.y**2)  # f'(net) = 1 - tanh(net)^2


@dataclass
class ReLU:
    def forward(self, net: np.ndarray) -> np.ndarray:
        self.active = net > 0
        return np.where(self.active, net, 0.0)

    def backward(self, delta: np.ndarray) -> np.ndarray:
        return delta * self.active  # f'(net) = 1 where net > 0, else 0


@dataclass
class MaxPool:
    """Max over windows of ``kernel`` positions, ``stride`` apart (overlapping when stride < kernel)."""

    kernel: int | tuple[int, ...]
    stride: int | tuple[int, ...] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        n = x.ndim - 2
        self.k = _per_axis(self.kernel, n)
        self.s = self.k if self.stride is None else _per_axis(self.stride, n)
        self.in_shape = x.shape
        out_shape = _out_shape(x.shape[2:], self.k, self.s, "MaxPool")
        y = np.empty((*x.shape[:2], *out_shape))
        # argmax[..., j, :] = the input coordinates of window j's maximum (recorded for backward)
        self.argmax = np.empty((*x.shape[:2], *out_shape, n), dtype=np.int64)
        for j, win in _windows(out_shape, self.k, self.s):
            region = x[(slice(None), slice(None), *win)].reshape(*x.shape[:2], -1)  # (N, C, k_h*k_w)
            first_max = region.argmax(axis=-1)  # the first maximum in scan order, as PyTorch
            y[(..., *j)] = region.max(axis=-1)
            offsets = np.unravel_index(first_max, self.k)
            for axis, (jj, s, off) in enumerate(zip(j, self.s, offsets)):
                self.argmax[(..., *j, axis)] = jj * s + off
        return y

    def backward(self, delta: np.ndarray) -> np.ndarray:
        delta_x = np.zeros(self.in_shape)
        N, C = delta.shape[:2]
        batch = np.arange(N).reshape(N, 1, *[1] * (delta.ndim - 2))
        channel = np.arange(C).reshape(1, C, *[1] * (delta.ndim - 2))
        coords = tuple(self.argmax[..., axis] for axis in range(self.argmax.shape[-1]))
        # route every output's sensitivity to its recorded maximum; np.add.at *adds* where one input
        # was the maximum of several overlapping windows
        np.add.at(delta_x, (batch, channel, *coords), delta)
        return delta_x


@dataclass
class AvgPool:
    """Average over windows of ``kernel`` positions, ``stride`` apart (overlapping when stride < kernel)."""

    kernel: int | tuple[int, ...]
    stride: int | tuple[int, ...] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        n = x.ndim - 2
        self.k = _per_axis(self.kernel, n)
        self.s = self.k if self.stride is None else _per_axis(self.stride, n)
        self.in_shape = x.shape
        out_shape = _out_shape(x.shape[2:], self.k, self.s, "AvgPool")
        y = np.empty((*x.shape[:2], *out_shape))
        for j, win in _windows(out_shape, self.k, self.s):
            y[(..., *j)] = x[(slice(None), slice(None), *win)].mean(axis=tuple(range(2, x.ndim)))
        return y

    def backward(self, delta: np.ndarray) -> np.ndarray:
        delta_x = np.zeros(self.in_shape)
        size = math.prod(self.k)
        for j, win in _windows(delta.shape[2:], self.k, self.s):
            share = delta[(..., *j)] / size  # (N, C): every input of the window gets an equal share
            delta_x[(slice(None), slice(None), *win)] += share.reshape(*share.shape, *[1] * len(self.k))
        return delta_x


Layer = Conv | Tanh | ReLU | MaxPool | AvgPool


class Network:
    """Run a list of layers forward, then the sensitivities backward through them in reverse order."""

    def __init__(self, layers: Sequence[Layer]):
        self.layers = list(layers)

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, delta: np.ndarray) -> np.ndarray:
        """Take the output's sensitivity -dJ/dy; return the input's, -dJ/dx (weights' dJ/dw stored)."""
        for layer in reversed(self.layers):
            delta = layer.backward(delta)
        return delta


def squared_error(y: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """``J = 1/2 sum (t - y)^2`` and the output sensitivity ``delta = -dJ/dy = t - y``."""
    return 0.5 * float(np.sum((target - y) ** 2)), target - y
