"""Pooling: max/avg with kernel, stride, padding, dilation, ceil mode; ChannelMaxPool.

Slow twins: a loop over output positions and window taps (values, and gradients through autograd of
the loop), PyTorch's own pooling where it exists, gradcheck in float64.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.layers import AvgPool1d, AvgPool2d, ChannelMaxPool, MaxPool1d, MaxPool2d
from cnnkit.layers._common import out_size
from cnnkit.layers.pooling import _sum_and_divide
from helpers import values_and_grads

# (kernel, stride, padding, dilation, ceil_mode): overlapping, strided, padded, dilated, ceil-mode cases
CONFIGS = [
    ((3, 3), (1, 1), (1, 1), (2, 2), False),
    ((3, 2), (2, 3), (1, 1), (2, 3), True),
    ((2, 3), (3, 2), (1, 1), (3, 2), True),
    ((3, 3), (2, 2), (1, 0), (2, 1), True),
    ((2, 2), (1, 1), (0, 0), (3, 3), False),
    ((3, 3), (3, 2), (1, 1), (1, 2), True),
    ((2, 2), (2, 2), (1, 1), (1, 1), True),  # dilation 1 through the same code
]
# Average pooling allows padding up to half the *dilated* kernel (PyTorch's max pooling does not).
AVG_CONFIGS = [*CONFIGS, ((3, 3), (2, 3), (2, 3), (2, 3), True)]


def naive_pool_2d(x, k, s, p, d, ceil_mode, op, count_include_pad=True):
    """Loop over output positions and taps; padding is -inf for max, 0 (counted or not) for avg."""
    B, C, H, W = x.shape
    oh, ow = (out_size(n, ki, si, pi, di, ceil_mode) for n, ki, si, pi, di in zip((H, W), k, s, p, d))
    rows = []
    for i in range(oh):
        row = []
        for j in range(ow):
            taps, count = [], 0
            for a, b in itertools.product(range(k[0]), range(k[1])):
                r, c = i * s[0] - p[0] + a * d[0], j * s[1] - p[1] + b * d[1]
                if 0 <= r < H and 0 <= c < W:
                    taps.append(x[:, :, r, c])
                    count += 1
                elif count_include_pad and -p[0] <= r < H + p[0] and -p[1] <= c < W + p[1]:
                    count += 1  # a padding zero that the divisor counts
            stacked = torch.stack(taps, dim=-1)
            row.append(stacked.amax(-1) if op == "max" else stacked.sum(-1) / count)
        rows.append(torch.stack(row, dim=-1))
    return torch.stack(rows, dim=-2)



@pytest.mark.parametrize("k,s,p,d,ceil_mode", AVG_CONFIGS)
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool_2d_matches_loop(k, s, p, d, ceil_mode, count_include_pad):
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64)
    pool = AvgPool2d(k, s, p, d, ceil_mode, count_include_pad=count_include_pad)
    y, g = values_and_grads(pool, x)
    y_ref, g_ref = values_and_grads(lambda t: naive_pool_2d(t, k, s, p, d, ceil_mode, "avg",
                                                           count_include_pad), x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("k,s,p,d,ceil_mode", CONFIGS)
def test_max_pool_2d_matches_loop(k, s, p, d, ceil_mode):
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64)
    y, g = values_and_grads(MaxPool2d(k, s, p, d, ceil_mode), x)
    y_ref, g_ref = values_and_grads(lambda t: naive_pool_2d(t, k, s, p, d, ceil_mode, "max"), x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-13)  # overlapping windows add up


@pytest.mark.parametrize("cls,op", [(AvgPool1d, "avg"), (MaxPool1d, "max")])
def test_1d_pools_match_loop(cls, op):
    x = torch.randn(2, 3, 17, dtype=torch.float64)
    for k, s, p, d, ceil_mode in [(3, 2, 1, 3, True), (2, 1, 1, 2, False), (3, 3, 1, 1, True)]:
        y, g = values_and_grads(cls(k, s, p, d, ceil_mode), x)
        y_ref, g_ref = values_and_grads(
            lambda t, k=k, s=s, p=p, d=d, c=ceil_mode: naive_pool_2d(
                t.unsqueeze(2), (1, k), (1, s), (0, p), (1, d), c, op).squeeze(2), x)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-13)
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_dilation_one_is_pytorch_avg_pool(ceil_mode, count_include_pad):
    x = torch.randn(2, 3, 13, 12, dtype=torch.float64)
    for k, s, p in [(3, 2, 1), (2, 3, 1), ((3, 2), (2, 1), (1, 0)), (4, 3, 2)]:
        ref = F.avg_pool2d(x, k, s, p, ceil_mode, count_include_pad)
        pool = AvgPool2d(k, s, p, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
        assert torch.equal(pool(x), ref)  # delegated: bit-identical
        # the sum/count path that serves dilation > 1 follows the same padding and ceil rules
        kk, ss, pp = (pool.kernel_size, pool.stride, pool.padding)
        out = ref.shape[2:]
        torch.testing.assert_close(_sum_and_divide(x, kk, ss, pp, (1, 1), out, count_include_pad, "t"), ref,
                                   rtol=0, atol=1e-14)


def test_max_pool_is_pytorch_max_pool():
    x = torch.randn(2, 3, 13, 12)
    for k, s, p, d, c in CONFIGS:
        assert torch.equal(MaxPool2d(k, s, p, d, c)(x), nn.MaxPool2d(k, s, p, d, ceil_mode=c)(x))
    values, idx = MaxPool2d(3, 2, 1, return_indices=True)(x)
    assert torch.equal(idx, F.max_pool2d(x, 3, 2, 1, return_indices=True)[1])


def test_dilated_avg_pool_float32_and_double_backward():
    x = torch.randn(2, 4, 20, 19, dtype=torch.float64)
    pool = AvgPool2d(3, 1, 2, dilation=2)
    torch.testing.assert_close(pool(x.float()), pool(x).float(), rtol=1e-5, atol=1e-6)
    # the hand-written backward is itself differentiable
    xs = torch.randn(1, 1, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(AvgPool2d(3, 2, 1, 2, True, count_include_pad=False), (xs,))


def test_gradcheck_all_pools():
    x2 = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    x1 = torch.randn(1, 2, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(MaxPool2d(3, 2, 1, 2, True), (x2,))
    assert torch.autograd.gradcheck(AvgPool2d(3, 2, 1, 2, True), (x2,))
    assert torch.autograd.gradcheck(MaxPool1d(3, 2, 1, 2), (x1,))
    assert torch.autograd.gradcheck(AvgPool1d(3, 2, 1, 3, count_include_pad=False), (x1,))
    assert torch.autograd.gradcheck(ChannelMaxPool(3), (torch.randn(2, 6, 4, 3, dtype=torch.float64,
                                                                    requires_grad=True),))


def test_channel_max_pool_matches_loop():
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    pool = ChannelMaxPool(3)
    y, g = values_and_grads(pool, x)
    y_ref, g_ref = values_and_grads(
        lambda t: torch.stack([torch.stack([t[:, j * 3 + i] for i in range(3)], -1).amax(-1)
                               for j in range(2)], dim=1), x)
    assert y.shape == (2, 2, 5, 4)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    # per pixel: also for 1D maps and plain feature vectors (maxout units)
    assert ChannelMaxPool(2)(torch.randn(3, 4, 7)).shape == (3, 2, 7)
    v = torch.tensor([[1.0, 5.0, 2.0, -1.0]])
    assert ChannelMaxPool(2)(v).tolist() == [[5.0, 2.0]]
    values, idx = ChannelMaxPool(2, return_indices=True)(v)
    assert idx.tolist() == [[1, 0]]


@pytest.mark.parametrize("make,x,match", [
    (lambda: MaxPool2d(5), torch.zeros(1, 1, 4, 4), "larger than the padded input"),
    (lambda: AvgPool2d(3, dilation=3), torch.zeros(1, 1, 6, 6), "larger than the padded input"),
    (lambda: AvgPool2d(3, padding=2), torch.zeros(1, 1, 8, 8), "at most half"),
    (lambda: MaxPool2d(3, padding=2, dilation=3), torch.zeros(1, 1, 8, 8), "PyTorch's rule"),
    (lambda: AvgPool2d(2), torch.zeros(1, 8, 8), "4-d input"),
    (lambda: MaxPool1d(2), torch.zeros(1, 1, 8, 8), "3-d input"),
    (lambda: AvgPool2d(2, 1, 2, dilation=4, count_include_pad=False), torch.zeros(1, 1, 1, 1),
     "only of padding"),
    (lambda: ChannelMaxPool(4), torch.zeros(1, 6, 3, 3), "not divisible"),
    (lambda: AvgPool2d(2, dilation=2), torch.zeros(1, 1, 6, 6, dtype=torch.long), "floating-point"),
])
def test_bad_arguments_are_config_errors(make, x, match):
    with pytest.raises(ConfigError, match=match):
        make()(x)


@pytest.mark.parametrize("make", [lambda: AvgPool2d(0), lambda: MaxPool2d((2, 2, 2)),
                                  lambda: AvgPool1d(2, -1), lambda: ChannelMaxPool(0),
                                  lambda: MaxPool2d(2, padding=-1)])
def test_bad_constructor_arguments_are_config_errors(make):
    with pytest.raises(ConfigError):
        make()
