"""LocallyConnected1d/2d and TiledConv1d/2d against loops over output locations and taps."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from cnnkit.errors import ConfigError
from cnnkit.layers import LocallyConnected1d, LocallyConnected2d, TiledConv1d, TiledConv2d


def loop_filter_per_location(x, kernel_at, bias_at, out_hw, k, s, p, d):
    """y[b, o, i, j] = sum_{c, a, e} K(i, j)[o, c, a, e] x_pad[b, c, i*s + a*d, j*s + e*d] + bias(i, j)[o]."""
    xp = F.pad(x, (p[1], p[1], p[0], p[0]))
    rows = []
    for i in range(out_hw[0]):
        row = []
        for j in range(out_hw[1]):
            w, acc = kernel_at(i, j), bias_at(i, j)
            for a, b in itertools.product(range(k[0]), range(k[1])):
                tap = xp[:, :, i * s[0] + a * d[0], j * s[1] + b * d[1]]  # (B, C)
                acc = acc + tap @ w[:, :, a, b].T
            row.append(acc)
        rows.append(torch.stack(row, dim=-1))
    return torch.stack(rows, dim=-2)  # (B, O, out_h, out_w)


def gradcheck_module(module, x):
    """gradcheck with respect to the input and every parameter (float64)."""
    names = [name for name, _ in module.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))
    inputs = (x.detach().double().requires_grad_(), *(p.detach().double().requires_grad_()
                                                      for p in module.parameters()))
    return torch.autograd.gradcheck(fn, inputs)


def values_and_grads(module, x, seed=0):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    grads = torch.autograd.grad(y, [x, *module.parameters()], g)
    return y.detach(), grads


def loop_module(fn):
    """Wrap a loop implementation that reads the given module's parameters (so grads line up)."""
    class Loop(torch.nn.Module):
        def __init__(self, ref):
            super().__init__()
            self.ref = ref

        def forward(self, x):
            return fn(self.ref, x)
    return Loop


def lc_loop(m, x):
    oh, ow = m.output_size
    w = m.weight.view(oh, ow, m.out_channels, m.in_channels, *m.kernel_size)
    bias = (lambda i, j: m.bias[:, i, j]) if m.bias is not None else (lambda i, j: 0.0)
    return loop_filter_per_location(x, lambda i, j: w[i, j], bias, (oh, ow), m.kernel_size, m.stride,
                                    m.padding, m.dilation)


@pytest.mark.parametrize("k,s,p,d,bias", [((3, 2), (2, 1), (1, 0), (1, 2), True), (2, 1, 0, 1, False),
                                          (3, 3, 2, 2, True)])
def test_locally_connected_2d_matches_loop(k, s, p, d, bias):
    m = LocallyConnected2d(3, 4, (8, 9), k, s, p, d, bias=bias).double()
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    y, grads = values_and_grads(m, x)
    y_ref, grads_ref = values_and_grads(loop_module(lc_loop)(m), x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
    assert m.weight.shape == (y.shape[2] * y.shape[3], 4, 3 * m.kernel_size[0] * m.kernel_size[1])


def test_locally_connected_1d_matches_loop_and_gradcheck():
    m = LocallyConnected1d(2, 3, 13, 3, stride=2, padding=1, dilation=2).double()
    x = torch.randn(2, 2, 13, dtype=torch.float64)
    (L,) = m.output_size
    w = m.weight.view(L, 3, 2, 3)
    ref = torch.stack([sum(F.pad(x, (1, 1))[:, :, i * 2 + a * 2] @ w[i, :, :, a].T for a in range(3))
                       + m.bias[:, i] for i in range(L)], dim=-1)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-12)
    assert gradcheck_module(m, x[:1])


def test_locally_connected_with_tied_weights_is_a_convolution():
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    m = LocallyConnected2d(3, 4, (9, 8), 3, stride=2, padding=1).double()
    with torch.no_grad():
        m.weight.copy_(conv.weight.reshape(1, 4, -1).expand_as(m.weight))
        m.bias.copy_(conv.bias.view(4, 1, 1).expand_as(m.bias))
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), conv(x), rtol=0, atol=1e-12)


def test_locally_connected_gradcheck_2d():
    m = LocallyConnected2d(2, 2, (5, 6), (2, 3), stride=(1, 2), padding=(1, 0)).double()
    assert gradcheck_module(m, torch.randn(1, 2, 5, 6, dtype=torch.float64))


def tiled_loop(m, x):
    """Kernel of location (i, j): its region's (array_split bands) or its tile's (i % t, j % t)."""
    oh = (x.shape[2] + 2 * m.padding[0] - (m.kernel_size[0] - 1) * m.dilation[0] - 1) // m.stride[0] + 1
    ow = (x.shape[3] + 2 * m.padding[1] - (m.kernel_size[1] - 1) * m.dilation[1] - 1) // m.stride[1] + 1
    if m.mode == "regions":
        bands = [torch.tensor_split(torch.arange(n), g) for n, g in zip((oh, ow), m.grid)]
        region = [{int(v): r for r, band in enumerate(axis) for v in band} for axis in bands]
        at = lambda i, j: (region[0][i], region[1][j])  # noqa: E731
    else:
        at = lambda i, j: (i % m.grid[0], j % m.grid[1])  # noqa: E731
    bias = (lambda i, j: m.bias[at(i, j)]) if m.bias is not None else (lambda i, j: 0.0)
    return loop_filter_per_location(x, lambda i, j: m.weight[at(i, j)], bias, (oh, ow), m.kernel_size,
                                    m.stride, m.padding, m.dilation)


@pytest.mark.parametrize("grid", [{"regions": (2, 3)}, {"regions": (3, 1)}, {"tile_size": (2, 3)},
                                  {"tile_size": 1}])
@pytest.mark.parametrize("k,s,p,d", [(3, 1, 1, 1), ((3, 2), (2, 1), (1, 0), (1, 2))])
def test_tiled_conv_2d_matches_loop(grid, k, s, p, d):
    m = TiledConv2d(2, 3, k, stride=s, padding=p, dilation=d, **grid).double()
    x = torch.randn(2, 2, 10, 11, dtype=torch.float64)
    y, grads = values_and_grads(m, x)
    y_ref, grads_ref = values_and_grads(loop_module(tiled_loop)(m), x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)


def test_tiled_conv_special_cases_and_gradcheck():
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64)
    # one region, or tile size 1: an ordinary convolution
    for grid in ({"regions": 1}, {"tile_size": 1}):
        m = TiledConv2d(2, 3, 3, padding=1, **grid).double()
        torch.testing.assert_close(m(x), F.conv2d(x, m.weight[0, 0], m.bias[0, 0], padding=1), rtol=0,
                                   atol=1e-12)
    small = torch.randn(1, 1, 6, 7, dtype=torch.float64)
    assert gradcheck_module(TiledConv2d(1, 2, 3, regions=(2, 2), stride=2, padding=1).double(), small)
    assert gradcheck_module(TiledConv2d(1, 1, 2, tile_size=(3, 2), dilation=2).double(), small)


def test_tiled_conv_1d():
    x = torch.randn(2, 2, 15, dtype=torch.float64)
    for grid in ({"regions": 3}, {"tile_size": 2}):
        m = TiledConv1d(2, 3, 3, stride=2, padding=1, **grid).double()
        ref = TiledConv2d(2, 3, (1, 3), stride=(1, 2), padding=(0, 1),
                          **{key: (1, v) for key, v in grid.items()}).double()
        with torch.no_grad():
            ref.weight.copy_(m.weight.view_as(ref.weight))
            ref.bias.copy_(m.bias.view_as(ref.bias))
        torch.testing.assert_close(m(x), ref(x.unsqueeze(2)).squeeze(2), rtol=0, atol=0)
        assert gradcheck_module(m, x[:1, :, :9])


def test_parameter_counts():
    lc = LocallyConnected2d(3, 8, (32, 32), 5)  # 28 x 28 locations, each 8 x (3*5*5) + bias
    assert sum(p.numel() for p in lc.parameters()) == 28 * 28 * 8 * 75 + 8 * 28 * 28
    tiled = TiledConv2d(3, 8, 5, regions=(2, 2))
    assert sum(p.numel() for p in tiled.parameters()) == 4 * (8 * 75 + 8)


@pytest.mark.parametrize("make,x,match", [
    (lambda: LocallyConnected2d(3, 4, (8, 8), 3), torch.zeros(1, 3, 9, 8), "built for input size"),
    (lambda: LocallyConnected2d(3, 4, (8, 8), 3), torch.zeros(1, 2, 8, 8), "expects 3 input channels"),
    (lambda: LocallyConnected1d(3, 4, 8, 3), torch.zeros(1, 3, 8, 8), "3-d input"),
    (lambda: TiledConv2d(1, 1, 5, regions=2), torch.zeros(1, 1, 4, 6), "larger than the padded input"),
    (lambda: TiledConv2d(1, 1, 3, regions=(4, 1)), torch.zeros(1, 1, 5, 5), "smaller than the regions grid"),
    (lambda: TiledConv2d(1, 1, 3, tile_size=4), torch.zeros(1, 1, 5, 5), "smaller than the tiles grid"),
])
def test_bad_inputs_are_config_errors(make, x, match):
    with pytest.raises(ConfigError, match=match):
        make()(x)


@pytest.mark.parametrize("make,match", [
    (lambda: LocallyConnected2d(3, 4, (4, 4), 5), "larger than the padded input"),
    (lambda: LocallyConnected2d(0, 4, (8, 8), 3), "in_channels"),
    (lambda: LocallyConnected2d(3, 4, (8, 8), (3, 3, 3)), "kernel_size"),
    (lambda: TiledConv2d(1, 1, 3), "exactly one of"),
    (lambda: TiledConv2d(1, 1, 3, regions=2, tile_size=2), "exactly one of"),
    (lambda: TiledConv2d(1, 1, 3, regions=0), "regions"),
])
def test_bad_constructor_arguments_are_config_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
