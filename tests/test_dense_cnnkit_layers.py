"""cnnkit's own layers in dense networks: dense output equals patch-by-patch, forward and backward."""

import pytest
import torch
from torch import nn

from cnnkit.dense import densify, patch_by_patch
from cnnkit.errors import UnsupportedLayerError
from cnnkit.layers import AvgPool2d, ChannelMaxPool, LocalContrastNorm1d, LocalContrastNorm2d, MaxPool2d


def check(net, patch, size, nd=2, batch=2, channels=2):
    torch.manual_seed(0)
    net = net.double().eval()
    x = torch.randn(batch, channels, *((size,) * nd), dtype=torch.float64)
    dense = densify(net, patch)
    y = dense(x)
    ref = patch_by_patch(net, x, patch)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-10, rtol=0), float((y - ref).abs().max())
    # gradient of a dense loss == sum of per-patch gradients
    w = torch.randn_like(y)
    grads = torch.autograd.grad((dense(x) * w).sum(), list(net.parameters()))
    ref_grads = torch.autograd.grad((patch_by_patch(net, x, patch) * w).sum(), list(net.parameters()))
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-9), float((g - r).abs().max())
    return dense


def test_channel_max_pool_over_rotated_filters():
    net = nn.Sequential(nn.Conv2d(2, 8, 3), ChannelMaxPool(4), nn.Tanh(), nn.MaxPool2d(2),
                        nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    check(net, 10, 9)


def test_cnnkit_pooling_with_dilation():
    net = nn.Sequential(nn.Conv2d(2, 3, 2), AvgPool2d(2, stride=2, dilation=2), nn.ReLU(),
                        MaxPool2d(2, stride=1, dilation=2), nn.Conv2d(3, 2, 2))
    check(net, 11, 8)


def test_valid_lcn_2d_and_1d():
    net = nn.Sequential(nn.Conv2d(2, 3, 2), LocalContrastNorm2d(3, 1.0, padding="valid", c=0.5),
                        nn.MaxPool2d(2), LocalContrastNorm2d(3, padding="valid", c=0.1, dilation=1),
                        nn.Conv2d(3, 2, 1))
    check(net, 15, 7)
    net1 = nn.Sequential(nn.Conv1d(2, 3, 3), nn.MaxPool1d(2), LocalContrastNorm1d(3, padding="valid", c=0.2),
                         nn.Conv1d(3, 2, 2))
    check(net1, 14, 10, nd=1)


@pytest.mark.parametrize("layer,reason", [
    (LocalContrastNorm2d(3, padding="same", c=1.0), "padding='same'"),
    (LocalContrastNorm2d(3, padding="valid"), "c='mean'"),
])
def test_lcn_that_cannot_be_exact_is_refused(layer, reason):
    net = nn.Sequential(nn.Conv2d(1, 2, 2), layer, nn.Conv2d(2, 2, 1))
    with pytest.raises(UnsupportedLayerError, match=reason):
        densify(net, 9)
