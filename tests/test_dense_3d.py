"""densify on volumes: 3D patch nets (Conv3d, 3D pooling, BatchNorm3d, FC after a C x M x M x M map,
branches) give patch by patch's result at every voxel, values and gradients, in every layout and
tile shape; what cannot be exact in 3D is refused, naming the layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cnnkit.dense import densify, patch_by_patch
from cnnkit.errors import UnsupportedLayerError
from test_dense_property import Cat  # two branches concatenated on channels


def _f64(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


def _conv_pool_conv_fc() -> tuple[nn.Module, int]:
    """Strided conv, max and (overlapping, later dilated) average pooling, then FC on 4 x 2 x 2 x 2."""
    model = nn.Sequential(nn.Conv3d(2, 3, 3), nn.ReLU(), nn.MaxPool3d(2, 2), nn.Conv3d(3, 4, 2, stride=2),
                          nn.BatchNorm3d(4), nn.Dropout3d(0.5), nn.AvgPool3d(2, 1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 2 * 2 * 2, 6), nn.ELU(), nn.Dropout(0.5), nn.Linear(6, 3))
    return _f64(model), 14  # 14 -> 12 -> 6 -> 3 -> 2


class TwoBranch(nn.Module):
    """Inception-like concatenation and a residual addition, on a (6, 5, 4) patch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(1, 3, (3, 2, 1))  # (6, 5, 4) -> (4, 4, 4)
        self.a = nn.Conv3d(3, 2, 2, stride=2)  # -> (2, 2, 2)
        self.b = nn.Conv3d(3, 2, 1)
        self.res = nn.Conv3d(4, 4, 1)
        self.head = nn.Conv3d(4, 5, 2)  # -> 1 x 1 x 1

    def forward(self, x):
        y = F.relu(self.stem(x))
        z = torch.cat([self.a(y), F.max_pool3d(self.b(y), 2)], dim=1)
        z = z + torch.sigmoid(self.res(z))
        return self.head(z).flatten(1)


def _grads(model: nn.Module, out: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    params = list(model.parameters())
    return list(torch.autograd.grad((out * w).sum(), params))


@pytest.mark.parametrize("mode,border", [("dilated", "zeros"), ("space_to_batch", "replicate"),
                                         ("auto", "reflect")])
def test_conv_pool_conv_fc_net_values_and_gradients(mode, border):
    model, patch = _conv_pool_conv_fc()
    x = torch.randn(1, 2, 8, 9, 8, dtype=torch.float64)
    dense = densify(model, patch, mode=mode, border=border)  # int patch: 3D read off the Conv3d
    assert dense.patch == (14, 14, 14)
    out = dense(x)
    ref = patch_by_patch(model, x, patch, border=border)
    assert out.shape == ref.shape == (1, 3, 8, 9, 8)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # a loss on the dense output trains the patch net as the sum of the per-patch losses would
    w = torch.randn_like(ref)
    for gd, gp in zip(_grads(model, dense(x), w), _grads(model, patch_by_patch(model, x, patch, border=border), w)):
        torch.testing.assert_close(gd, gp, rtol=1e-9, atol=1e-9)
    labels = [r["op"] for r in dense.layers()]
    assert "fc->conv 4x2x2x2->6" in labels and "avg-pool 2x2x2" in labels
    dilations = {r["name"]: r["dilation"] for r in dense.layers() if "dilation" in r}
    assert dilations["3"] == (2, 2, 2) and dilations["6"] == (4, 4, 4) and dilations["9"] == (4, 4, 4)


def test_two_branch_net_with_a_triple_patch_size_in_float32_and_float64():
    model = _f64(TwoBranch())
    patch = (6, 5, 4)
    x = torch.randn(1, 1, 7, 8, 5, dtype=torch.float64)
    for mode in ("dilated", "space_to_batch"):
        out = densify(model, patch, mode=mode)(x)
        torch.testing.assert_close(out, patch_by_patch(model, x, patch), rtol=1e-10, atol=1e-10)
    model32, x32 = model.float(), x.float()
    out32 = densify(model32, patch)(x32)
    ref32 = patch_by_patch(model32, x32, patch)
    assert (out32 - ref32).abs().max() <= 1e-4 * ref32.abs().max().clamp_min(1.0)


class FunctionalNet(nn.Module):
    """Written with functions: F.conv3d on its own weights, dilated F.avg_pool3d (after a stride),
    global mean and adaptive pooling over the three spatial axes, a residual add."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2, 2, 3, 2))
        self.c = nn.Conv3d(3, 3, 2, stride=2)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        y = torch.tanh(F.conv3d(x, self.w))  # (7, 8, 7) -> (6, 6, 6)
        y = self.c(y)  # -> (3, 3, 3), stride 2
        y = y + torch.sigmoid(y)
        z = F.avg_pool3d(y, 2, 1)  # -> (2, 2, 2), dilated by 2 densely
        return self.fc(z.mean(dim=(2, 3, 4))) + self.fc(F.adaptive_max_pool3d(z, 1).flatten(1))


def test_functional_3d_net_in_float64_and_float32():
    model = _f64(FunctionalNet())
    patch = (7, 8, 7)
    x = torch.randn(2, 2, 6, 5, 7, dtype=torch.float64)
    dense = densify(model, patch, in_channels=2)
    torch.testing.assert_close(dense(x), patch_by_patch(model, x, patch), rtol=1e-10, atol=1e-10)
    model32, x32 = model.float(), x.float()
    for mode in ("dilated", "space_to_batch"):
        out32 = densify(model32, patch, mode=mode)(x32)  # in_channels read off F.conv3d's weight
        ref32 = patch_by_patch(model32, x32, patch)
        assert (out32 - ref32).abs().max() <= 1e-4 * ref32.abs().max().clamp_min(1.0)


def test_patch_by_patch_on_a_sample_of_voxels():
    model, patch = _conv_pool_conv_fc()
    x = torch.randn(1, 2, 5, 6, 7, dtype=torch.float64)
    full = patch_by_patch(model, x, patch, border="replicate")
    pixels = torch.tensor([[0, 0, 0], [4, 5, 6], [2, 1, 3]])
    some = patch_by_patch(model, x, patch, border="replicate", pixels=pixels)
    assert some.shape == (1, 3, 3)
    # (BLAS blocking depends on the batch of patches: equal to rounding, not bit for bit)
    torch.testing.assert_close(some, full[:, :, pixels[:, 0], pixels[:, 1], pixels[:, 2]], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["dilated", "space_to_batch", "auto"])
def test_tiled_equals_untiled_bit_for_bit(mode):
    model, patch = _conv_pool_conv_fc()
    x = torch.randn(1, 2, 9, 8, 10, dtype=torch.float64)
    dense = densify(model, patch, mode=mode, border="reflect")
    full = dense(x)
    for tile in [(2, 3, 4), (5, 3, 7), (9, 8, 1)]:
        dense.tile_size = tile
        assert torch.equal(dense(x), full), tile
    dense.tile_size = None
    with torch.no_grad():  # the memory model's tiles (under autograd they would keep every tile's maps)
        dense.max_memory = dense.plan((9, 8, 10), torch.float64).predicted - 1  # one pass does not fit
        assert dense.tile_for((9, 8, 10), 8) is not None
        assert torch.equal(dense(x), full)


@pytest.mark.parametrize("model,patch,match", [
    (nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Conv3d(2, 2, 5)), 5, "layer '0'.*zero padding"),
    (nn.Sequential(nn.Conv3d(1, 2, 3, padding=1, padding_mode="replicate"), nn.Conv3d(2, 2, 5)), 5,
     "layer '0'.*replicate padding"),
    (nn.Sequential(nn.Conv3d(1, 2, 3), nn.AdaptiveAvgPool3d(2), nn.Flatten()), 7, "layer '1'.*unequal"),
    (nn.Sequential(nn.Conv3d(1, 2, 2), nn.MaxPool3d(2, ceil_mode=True), nn.Conv3d(2, 2, 2)), 4,
     "layer '1'.*ceil_mode"),
    (nn.Sequential(nn.Conv3d(1, 2, 3), nn.Upsample(scale_factor=2), nn.Conv3d(2, 2, 6)), 5,
     "layer '1'.*Upsample"),
    # MaxPool3d would read a 2D patch (N, C, H, W) as one unbatched volume, pooling over N and C
    (nn.Sequential(nn.Conv2d(1, 2, 1), nn.MaxPool3d(2), nn.Conv2d(1, 3, 2), nn.Flatten()), (4, 4),
     "layer '1'.*MaxPool3d in a 2D"),
])
def test_refusals_name_the_layer(model, patch, match):
    with pytest.raises(UnsupportedLayerError, match=match):
        densify(model.eval(), patch)


# --------------------------------------------------------------------------- random 3D nets


@st.composite
def architectures(draw):
    """A small body of 3D window ops (any kernel, stride, dilation, groups; max and average pooling;
    a concatenation branch; BatchNorm) and a conv or flatten + FC head; the patch (one size per
    axis) is worked out backwards from the head's map size, with floor-mode remainders."""
    c = cin = draw(st.integers(1, 2))
    layers: list[nn.Module] = []
    geometry: list[tuple[int, int, int]] = []  # (kernel, stride, dilation) of each window op, in order
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv", "conv", "maxpool", "avgpool", "cat", "bn"]))
        k, s = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        if kind == "conv":
            dil = draw(st.integers(1, 2)) if k > 1 else 1
            groups = draw(st.sampled_from([1, c])) if c > 1 else 1
            out = draw(st.integers(1, 2)) * groups
            layers.append(nn.Conv3d(c, out, k, stride=s, dilation=dil, groups=groups))
            geometry.append((k, s, dil))
            c = out
        elif kind == "maxpool":
            dil = draw(st.integers(1, 2)) if k > 1 else 1
            layers.append(nn.MaxPool3d(k, stride=s, dilation=dil))
            geometry.append((k, s, dil))
        elif kind == "avgpool":
            layers.append(nn.AvgPool3d(k, stride=s))
            geometry.append((k, s, 1))
        elif kind == "cat":
            layers.append(Cat(nn.Conv3d(c, 2, k, stride=s), nn.Sequential(nn.MaxPool3d(k, stride=s),
                                                                         nn.Conv3d(c, 1, 1))))
            geometry.append((k, s, 1))
            c = 3
        else:
            layers.append(nn.BatchNorm3d(c))
        if draw(st.booleans()):
            layers.append(draw(st.sampled_from([nn.Tanh, nn.ReLU, nn.Sigmoid]))())
    m = draw(st.integers(1, 2))  # map size entering the head
    if draw(st.booleans()):
        layers += [nn.Conv3d(c, 2, m), nn.Flatten()]
    else:
        layers += [nn.Flatten(), nn.Linear(c * m**3, 3), nn.Tanh(), nn.Linear(3, 2)]
    patch = []
    for _axis in range(3):
        size = m
        for k, s, dil in reversed(geometry):
            size = (size - 1) * s + dil * (k - 1) + 1 + draw(st.integers(0, s - 1))
        patch.append(size)
    return nn.Sequential(*layers), tuple(patch), cin


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), data=st.data())
def test_random_3d_nets_equal_patch_by_patch(arch, data):
    model, patch, cin = arch
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = _f64(model)
    size = tuple(data.draw(st.integers(1, 5)) for _ in range(3))
    border = data.draw(st.sampled_from(["zeros", "replicate"]))
    mode = data.draw(st.sampled_from(["dilated", "space_to_batch", "auto"]))
    x = torch.randn(1, cin, *size, dtype=torch.float64)
    dense = densify(model, patch, border=border, mode=mode, in_channels=cin)
    out = dense(x)
    ref = patch_by_patch(model, x, patch, border=border)
    assert out.shape == ref.shape == (1, 2, *size)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ref)
    for gd, gp in zip(_grads(model, dense(x), w), _grads(model, patch_by_patch(model, x, patch, border=border), w)):
        torch.testing.assert_close(gd, gp, rtol=1e-9, atol=1e-9)
    dense.tile_size = tuple(data.draw(st.integers(1, 3)) for _ in range(3))
    assert torch.equal(dense(x), out)
