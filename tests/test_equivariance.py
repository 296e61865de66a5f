"""Equivariance and invariance measures, and the lecture's answers they give.

"Is convolution equivariant to changes in the scale or rotation?" - translation yes, rotation and
scale no (unless the filters are symmetric or 1x1); pooling over rotated copies of one filter
(ChannelMaxPool) learns rotation invariance where a single filter has none.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.analysis.equivariance import (
    Rotation,
    Scaling,
    Translation,
    _affine_resample,
    equivariance_error,
    invariance_error,
)
from cnnkit.errors import ConfigError
from cnnkit.layers import ChannelMaxPool, gaussian_window


class GlobalMax(nn.Module):
    def forward(self, x):
        return x.amax(dim=(2, 3))


def conv_with(weight: torch.Tensor, padding_mode: str = "zeros") -> nn.Conv2d:
    """A bias-free convolution with the given (O, C, k, k) filters and 'same' padding."""
    k = weight.shape[-1]
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], k, padding=k // 2, bias=False,
                     padding_mode=padding_mode).to(weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


def rotate_filter(w: torch.Tensor, degrees: float) -> torch.Tensor:
    if degrees % 90 == 0:
        return torch.rot90(w, int(degrees // 90), dims=(-2, -1))
    a = math.radians(degrees)
    return _affine_resample(w[None, None], torch.tensor([[math.cos(a), -math.sin(a)],
                                                         [math.sin(a), math.cos(a)]]))[0, 0]


def glyph_f(size: int = 13) -> torch.Tensor:
    """A smoothed letter F: no rotation maps it onto itself. Zero mean, unit norm."""
    t = torch.zeros(size, size, dtype=torch.float64)
    t[2, 3:10] = t[2:11, 3] = t[6, 3:8] = 1.0
    t = F.conv2d(t[None, None], gaussian_window(5, 1.0, dtype=torch.float64)[None, None], padding=2)[0, 0]
    t = t - t.mean()
    return t / t.norm()


def test_grid_rotation_by_90_degrees_is_rot90():
    """The resampling path and the exact path agree on direction and centre."""
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    turned = _affine_resample(x, torch.tensor([[0.0, -1.0], [1.0, 0.0]]))
    torch.testing.assert_close(turned, torch.rot90(x, 1, dims=(-2, -1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(_affine_resample(x, torch.eye(2)), x, rtol=0, atol=1e-12)


def test_convolution_is_translation_equivariant():
    torch.manual_seed(0)
    circular = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                             nn.Conv2d(4, 3, 5, padding=2, padding_mode="circular")).double()
    assert equivariance_error(circular, Translation((3, -5))) < 1e-12
    zero_padded = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                                nn.Conv2d(4, 3, 5, padding=2)).double()
    assert equivariance_error(zero_padded, Translation((3, -5))) > 0.1  # the borders break it...
    # ...but only within the receptive-field radius (1 + 2 pixels) of the borders and of the seam
    assert equivariance_error(zero_padded, Translation((3, -5), mode="crop", margin=3)) < 1e-12
    assert equivariance_error(zero_padded, Translation((3, -5), mode="crop", margin=2)) > 1e-3
    # global average pooling on top: translation invariance
    gap = nn.Sequential(circular, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert invariance_error(gap, Translation((7, 2))) < 1e-12


def test_strided_module_is_equivariant_to_shifts_by_its_stride_only():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.MaxPool2d(2)).double()
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    assert equivariance_error(net, Translation((4, -2)), x) < 1e-12
    with pytest.raises(ConfigError, match="multiple of the module's stride"):
        equivariance_error(net, Translation((3, 0)), x)
    assert invariance_error(net, Translation((1, 0)), x) > 0.1  # a one-pixel shift changes the pooled map


def test_convolution_is_not_rotation_or_scale_equivariant():
    torch.manual_seed(2)
    random_filters = conv_with(torch.randn(4, 2, 5, 5, dtype=torch.float64))
    assert equivariance_error(random_filters, Rotation(90)) > 0.3
    assert equivariance_error(random_filters, Rotation(30, margin=2)) > 0.3
    assert equivariance_error(random_filters, Scaling(1.5, margin=2)) > 0.3
    assert equivariance_error(random_filters, Scaling(0.7, margin=2)) > 0.3
    # unless the filter is isotropic (rotation), or pointwise (scale)
    gaussian = conv_with(gaussian_window(5, 1.0, dtype=torch.float64)[None, None].repeat(1, 2, 1, 1))
    assert equivariance_error(gaussian, Rotation(90)) < 1e-12
    floor = equivariance_error(gaussian, Rotation(30, margin=2))
    assert floor < 0.15  # bilinear resampling vs filtering: the interpolation floor on white noise
    pointwise = nn.Conv2d(2, 3, 1).double()
    assert equivariance_error(pointwise, Scaling(1.5)) < 1e-12
    assert equivariance_error(pointwise, Scaling(0.7)) < 1e-12


def test_pooling_over_rotated_filters_learns_rotation_invariance():
    """The lecture's example: units driven by rotated copies of a template, max-pooled together,
    respond to the template in any of those rotations; a single filter does not."""
    template = glyph_f()
    image = 0.05 * torch.randn(1, 1, 49, 49, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    image[0, 0, 18:31, 18:31] += 3 * template  # the template, in noise, at the centre
    bank = torch.stack([rotate_filter(template, 90 * r) for r in range(4)])[:, None]  # (4, 1, 13, 13)
    pooled_map = nn.Sequential(conv_with(bank), ChannelMaxPool(4))
    single_map = conv_with(bank[:1])
    for turn in (Rotation(90), Rotation(180), Rotation(270)):
        # per position: the pooled map rotates with the input (equivariant), the single one does not
        assert equivariance_error(pooled_map, turn, image) < 1e-12
        assert equivariance_error(single_map, turn, image) > 0.3
        # the detector (max over positions) is invariant with the pool, not without
        assert invariance_error(nn.Sequential(pooled_map, GlobalMax()), turn, image) < 1e-12
        assert invariance_error(nn.Sequential(single_map, GlobalMax()), turn, image) > 0.3


def test_eight_rotated_filters_reduce_the_error_at_45_degrees():
    """Off the pixel grid the copies are bilinearly resampled, so invariance is approximate but
    far better than a single filter's."""
    template = glyph_f()
    image = 0.05 * torch.randn(1, 1, 49, 49, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    image[0, 0, 18:31, 18:31] += 3 * template
    bank = torch.stack([rotate_filter(template, 45 * r) for r in range(8)])[:, None]
    pooled = nn.Sequential(conv_with(bank), ChannelMaxPool(8), GlobalMax())
    single = nn.Sequential(conv_with(bank[:1]), GlobalMax())
    for turn in (Rotation(45), Rotation(135)):
        assert invariance_error(pooled, turn, image) < 0.5 * invariance_error(single, turn, image)


def test_default_input_and_errors():
    conv = nn.Conv2d(3, 2, 3, padding=1)
    assert equivariance_error(conv, Rotation(180)) > 0  # input (2, 3, 33, 33) read from in_channels
    with pytest.raises(ConfigError, match="pass x or input_shape"):
        equivariance_error(nn.ReLU(), Rotation(90))
    assert equivariance_error(nn.ReLU(), Rotation(90), input_shape=(1, 2, 8, 8)) == 0.0
    with pytest.raises(ConfigError, match="invariance_error for vector outputs"):
        equivariance_error(nn.Sequential(conv, GlobalMax()), Rotation(90))
    with pytest.raises(ConfigError, match="must be a Translation"):
        equivariance_error(conv, "rotate")
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\) inputs"):
        equivariance_error(conv, Rotation(90), torch.zeros(3, 8, 8))
    with pytest.raises(ConfigError, match="mode must be"):
        Translation(2, mode="reflect")
    with pytest.raises(ConfigError, match="factor must be positive"):
        Scaling(0)
