"""Property test: for random supported patch classifiers, the dense net equals patch-by-patch.

Architectures are drawn as a body (convs with any kernel/stride/dilation/groups, max/avg pooling
including overlapping windows and floor-mode tails, activations, BatchNorm, LRN, concatenation
branches and residual additions) and a head (conv to 1 x 1, flatten + FC layers, global or
adaptive pooling + FC). The patch size is worked out backwards from the head so the net outputs
one vector per patch; floor-mode remainders are drawn too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cnnkit.dense import densify, patch_by_patch

CONV = {1: nn.Conv1d, 2: nn.Conv2d}
MAXP = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
AVGP = {1: nn.AvgPool1d, 2: nn.AvgPool2d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
ADAPT = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}
ACTS = [nn.Tanh, lambda: nn.LeakyReLU(0.1), nn.ReLU, nn.Sigmoid, nn.ELU, nn.GELU, nn.Softplus]


class Cat(nn.Module):
    """Inception-like: two branches with the same geometry, concatenated on channels."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.cat([self.a(x), F.relu(self.b(x))], dim=1)


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x) * 0.5


class GlobalMean(nn.Module):
    def __init__(self, nd: int):
        super().__init__()
        self.dims = tuple(range(2, 2 + nd))

    def forward(self, x):
        return x.mean(dim=self.dims)


class FlattenView(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


@st.composite
def architectures(draw):
    nd = draw(st.sampled_from([1, 2]))
    c = cin = draw(st.integers(1, 2))
    layers: list[nn.Module] = []
    geometry: list[tuple[int, int, int]] = []  # (kernel, stride, dilation) of each window op, in order
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "maxpool", "avgpool", "cat", "residual", "bn"]))
        k, s = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        if kind == "conv":
            dil = draw(st.integers(1, 2)) if k > 1 else 1
            groups = draw(st.sampled_from([1, c])) if c > 1 else 1
            out = draw(st.integers(1, 3)) * groups
            layers.append(CONV[nd](c, out, k, stride=s, dilation=dil, groups=groups))
            geometry.append((k, s, dil))
            c = out
        elif kind == "maxpool":
            dil = draw(st.integers(1, 2)) if k > 1 else 1
            layers.append(MAXP[nd](k, stride=draw(st.integers(1, 3)), dilation=dil))
            geometry.append((k, layers[-1].stride, dil))
        elif kind == "avgpool":
            s = draw(st.integers(1, 3))
            layers.append(AVGP[nd](k, stride=s))
            geometry.append((k, s, 1))
        elif kind == "cat":
            a = CONV[nd](c, 2, k, stride=s)
            b = nn.Sequential(MAXP[nd](k, stride=s), CONV[nd](c, 1, 1))
            layers.append(Cat(a, b))
            geometry.append((k, s, 1))
            c = 3
        elif kind == "residual":
            layers.append(Residual(nn.Sequential(nn.Tanh(), CONV[nd](c, c, 1))))
        else:
            bn = BN[nd](c)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            layers.append(bn)
        if draw(st.booleans()):
            layers.append(draw(st.sampled_from(ACTS))())
    m = draw(st.integers(1, 3))  # map size entering the head
    k_out = draw(st.integers(1, 3))
    head = draw(st.sampled_from(["conv", "fc", "fc_view", "gap", "mean", "adaptive"]))
    if head == "conv":
        layers.append(CONV[nd](c, k_out, m))
    elif head in ("fc", "fc_view"):
        layers += [nn.Flatten() if head == "fc" else FlattenView(), nn.Linear(c * m**nd, 4), nn.Tanh(),
                   nn.Dropout(0.5), nn.Linear(4, k_out)]
    elif head == "gap":
        layers += [ADAPT[nd](1), nn.Flatten(), nn.Linear(c, k_out)]
    elif head == "mean":
        layers += [GlobalMean(nd), nn.Linear(c, k_out)]
    else:
        o = draw(st.sampled_from([d for d in (1, 2, 3) if m % d == 0]))
        layers += [ADAPT[nd](o), nn.Flatten(), nn.Linear(c * o**nd, k_out)]
    if draw(st.booleans()):
        layers.append(nn.LogSoftmax(dim=1))
    # patch size: walk back from the head's m, adding a floor-mode remainder for strides > 1
    patch = []
    for _axis in range(nd):
        size = m
        for k, s, dil in reversed(geometry):
            size = (size - 1) * s + dil * (k - 1) + 1 + draw(st.integers(0, s - 1))
        patch.append(size)
    model = nn.Sequential(*layers)
    return model, tuple(patch), cin, nd


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), data=st.data())
def test_dense_equals_patch_by_patch(arch, data):
    model, patch, cin, nd = arch
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = model.double().eval()
    n = data.draw(st.integers(1, 2))
    size = tuple(data.draw(st.integers(1, 7)) for _ in range(nd))
    border = data.draw(st.sampled_from(["zeros", "replicate"]))
    mode = data.draw(st.sampled_from(["dilated", "space_to_batch", "auto"]))
    x = torch.randn(n, cin, *size, dtype=torch.float64)

    # float64: to 1e-10
    dense = densify(model, patch, border=border, mode=mode, in_channels=cin)
    ref = patch_by_patch(model, x, patch, border=border)
    out = dense(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    # gradient of a dense loss == sum of per-patch gradients (float64)
    w = torch.randn_like(ref)
    params = [p for p in model.parameters()]
    g_dense = torch.autograd.grad((dense(x) * w).sum(), params, allow_unused=True)
    g_patch = torch.autograd.grad((patch_by_patch(model, x, patch, border=border) * w).sum(), params,
                                  allow_unused=True)
    for gd, gp in zip(g_dense, g_patch):
        assert (gd is None) == (gp is None)
        if gd is not None:
            torch.testing.assert_close(gd, gp, rtol=1e-9, atol=1e-9)

    # float32: to 1e-4 relative
    model32 = model.float()
    x32 = x.float()
    out32 = densify(model32, patch, border=border, mode=mode, in_channels=cin)(x32)
    ref32 = patch_by_patch(model32, x32, patch, border=border)
    scale = ref32.abs().max().clamp_min(1.0)
    assert (out32 - ref32).abs().max() <= 1e-4 * scale
