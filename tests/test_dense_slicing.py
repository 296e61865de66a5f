"""Slicing a map in the patch net (crops, strided slices, narrow, channel slices, split/chunk):
the dense net equals patch-by-patch, values and gradients, in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cnnkit.dense import densify, patch_by_patch
from cnnkit.errors import UnsupportedLayerError


def check(model: nn.Module, patch, x: torch.Tensor, mode: str = "auto") -> None:
    """Dense == patch-by-patch (to 1e-10), and a dense loss has the summed per-patch gradient."""
    model = model.double().eval()
    dense = densify(model, patch, mode=mode, in_channels=x.shape[1])
    ref = patch_by_patch(model, x, patch)
    out = dense(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ref)
    params = list(model.parameters())
    g_dense = torch.autograd.grad((dense(x) * w).sum(), params, allow_unused=True)
    g_patch = torch.autograd.grad((patch_by_patch(model, x, patch) * w).sum(), params, allow_unused=True)
    for gd, gp in zip(g_dense, g_patch):
        assert (gd is None) == (gp is None)
        if gd is not None:
            torch.testing.assert_close(gd, gp, rtol=1e-9, atol=1e-9)


class CropCat(nn.Module):
    """Inception / valid U-Net style: a 5x5 and a 3x3 branch, the bigger map cropped and both joined."""

    def __init__(self, pool: bool):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 3, 2, stride=2 if pool else 1), nn.Tanh())
        self.a = nn.Conv2d(3, 2, 5)
        self.b = nn.Conv2d(3, 3, 3)
        self.head = nn.Conv2d(5, 4, 3)

    def forward(self, x):
        x = self.stem(x)
        a, b = self.a(x), torch.relu(self.b(x))
        return self.head(torch.cat([a, b[:, :, 1:-1, 1:-1]], dim=1))


class AsymmetricCrop(nn.Module):
    def forward(self, x):
        x = self.c1(x)
        x = x[..., 2:, :-1]  # (N, 3, 6, 8) -> (N, 3, 4, 7)
        return self.c2(x.narrow(3, 1, 4).narrow(-1, -4, 3))  # width 7 -> 4 -> 3

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, (3, 1), stride=(1, 2))
        self.c2 = nn.Conv2d(3, 2, (4, 3))


class StridedSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3)
        self.c2 = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        return self.c2(torch.sigmoid(self.c1(x))[:, :, 1::2, ::3])  # (8, 9) -> (6, 7) -> (3, 3)


class SplitChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, stride=2)
        self.c2 = nn.Conv1d(2, 2, 3)
        self.c3 = nn.Conv1d(3, 3, 1)
        self.fc = nn.Linear(3 * 2, 3)

    def forward(self, x):
        a, b, c = self.c1(x).chunk(3, dim=1)  # 2 channels each, length 4
        g = torch.split(a * torch.sigmoid(b), [1, 1], 1)[1]
        y = torch.cat([self.c2(c), g[:, :, 1:-1]], dim=1)  # length 2
        y = self.c3(y)
        return self.fc(torch.flatten(y, 1))[:, 1:3]  # channel slice of the class vector


class ChannelSlices(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 2, stride=2)
        self.c2 = nn.Conv2d(2, 3, 2)

    def forward(self, x):
        y = torch.tanh(self.c1(x))
        return self.c2(y[:, 1:5:2] + y.narrow(1, 4, 2) + y[:, -2:])


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("mode", ["dilated", "space_to_batch"])
def test_cropped_branches_concatenated(pool, mode):
    torch.manual_seed(0)
    patch = 14 if pool else 8
    check(CropCat(pool), patch, torch.randn(2, 2, 11, 9, dtype=torch.float64), mode)


def test_asymmetric_crop_and_narrow():
    torch.manual_seed(1)
    check(AsymmetricCrop(), (8, 16), torch.randn(1, 1, 9, 13, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["dilated", "space_to_batch"])
def test_strided_slice_is_a_subsampling(mode):
    torch.manual_seed(2)
    check(StridedSlice(), (8, 9), torch.randn(2, 1, 10, 7, dtype=torch.float64), mode)


def test_split_and_chunk_along_channels():
    torch.manual_seed(3)
    check(SplitChunk(), 10, torch.randn(2, 2, 17, dtype=torch.float64))


def test_channel_slices_and_narrow():
    torch.manual_seed(4)
    check(ChannelSlices(), 4, torch.randn(1, 2, 9, 8, dtype=torch.float64))


def test_tiled_crop_equals_untiled_bit_for_bit():
    torch.manual_seed(5)
    model = CropCat(True).double().eval()
    x = torch.randn(1, 2, 19, 23, dtype=torch.float64)
    dense = densify(model, 14, border="reflect")
    full = dense(x)
    for tile in [(1, 1), (4, 7), (16, 16)]:
        dense.tile_size = tile
        assert torch.equal(dense(x), full), tile


class ReusedPart(nn.Module):
    """The same part of a chunk read twice, once after an activation that may run in place."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3), nn.Conv2d(2, 2, 3)

    def forward(self, x):
        parts = self.c1(x).chunk(2, dim=1)
        a = torch.relu(parts[0])
        return self.c2(a + parts[0] * parts[1])


def test_in_place_inference_leaves_split_parts_alone():
    torch.manual_seed(6)
    model = ReusedPart().eval()
    x = torch.randn(2, 1, 9, 8)
    with torch.no_grad():
        out = densify(model, 5)(x)
    torch.testing.assert_close(out, patch_by_patch(model, x, 5), rtol=1e-5, atol=1e-6)


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv, self.fn = nn.Conv2d(1, 4, 3), fn

    def forward(self, x):
        y = self.fn(self.conv(x))
        return y.reshape(y.shape[0], -1)


@pytest.mark.parametrize("fn, match", [
    (lambda y: y[:1], "slices the batch axis"),
    (lambda y: y[:, 0:1, 1], "integer"),
    (lambda y: y[:, None], "None"),
    (lambda y: y[:, torch.tensor([0, 2])], "tensor"),
    (lambda y: y.flatten(1)[:, 3:], "flattened map"),
    (lambda y: y.chunk(2, dim=2)[0], "axis 2"),
    (lambda y: y.narrow(0, 0, 1), "batch axis"),
])
def test_unsupported_slices_are_refused_naming_the_node(fn, match):
    with pytest.raises(UnsupportedLayerError, match=match) as err:
        densify(Fn(fn), 5, in_channels=1)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("layer '")


# --------------------------------------------------------------------------- property


class Branchy(nn.Module):
    """Two branches with kernels ka, kb (kb <= ka) from one map; the bigger map is cropped to the
    smaller by ``ka - kb`` split between its two ends, then both are concatenated."""

    def __init__(self, c: int, ka: int, kb: int, lead: int, nd: int, split: bool):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d)[nd - 1]
        self.a, self.b = conv(c, 2, ka), conv(c, 2, kb)
        self.lead, self.trail, self.nd, self.split = lead, ka - kb - lead, nd, split

    def forward(self, x):
        a, b = self.a(x), torch.tanh(self.b(x))
        crop = slice(self.lead, b.shape[-1] - self.trail)
        b = b[..., crop] if self.nd == 1 else b[:, :, crop, crop]
        if self.split:
            b1, b2 = b.chunk(2, dim=1)
            return torch.cat([b2, a, b1], dim=1)
        return torch.cat([a, b], dim=1)


@st.composite
def branchy_nets(draw):
    nd = draw(st.sampled_from([1, 2]))
    c = draw(st.integers(1, 2))
    conv = (nn.Conv1d, nn.Conv2d)[nd - 1]
    layers: list[nn.Module] = []
    geometry: list[tuple[int, int]] = []  # (kernel, stride) of each op that shrinks the map
    cin = c
    for i in range(draw(st.integers(1, 3))):
        kind = "branchy" if i == 0 else draw(st.sampled_from(["branchy", "conv", "stride_slice", "pool"]))
        if kind == "branchy":  # the first one always crops
            ka = draw(st.integers(1 if i else 2, 4))
            kb = draw(st.integers(1, ka - (0 if i else 1)))
            layers.append(Branchy(c, ka, kb, draw(st.integers(0, ka - kb)), nd, draw(st.booleans())))
            geometry.append((ka, 1))
            c = 4
        elif kind == "conv":
            k, s = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            layers.append(conv(c, 2, k, stride=s))
            geometry.append((k, s))
            c = 2
        elif kind == "stride_slice":
            s = draw(st.integers(2, 3))
            layers.append(StrideSlice(s, nd))
            geometry.append((1, s))
        else:
            layers.append((nn.MaxPool1d, nn.MaxPool2d)[nd - 1](2))
            geometry.append((2, 2))
        if draw(st.booleans()):
            layers.append(nn.ELU())
    m = draw(st.integers(1, 2))
    layers.append(conv(c, 2, m))
    size = m
    for k, s in reversed(geometry):
        size = (size - 1) * s + k + draw(st.integers(0, s - 1))
    return nn.Sequential(*layers), size, cin, nd


class StrideSlice(nn.Module):
    def __init__(self, s: int, nd: int):
        super().__init__()
        self.s, self.nd = s, nd

    def forward(self, x):
        return x[..., ::self.s] if self.nd == 1 else x[:, :, ::self.s, ::self.s]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=branchy_nets(), data=st.data())
def test_branchy_cropping_nets_equal_patch_by_patch(arch, data):
    model, patch, cin, nd = arch
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    size = tuple(data.draw(st.integers(1, 7)) for _ in range(nd))
    mode = data.draw(st.sampled_from(["dilated", "space_to_batch", "auto"]))
    check(model, patch, torch.randn(data.draw(st.integers(1, 2)), cin, *size, dtype=torch.float64), mode)
