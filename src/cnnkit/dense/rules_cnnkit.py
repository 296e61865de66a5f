"""Dense rules for cnnkit's own layers: its pooling (dilated average pooling included), channel
max-pooling (pooling over separately parameterised filters) and local contrast normalisation."""

from __future__ import annotations

import torch

from cnnkit.dense.ops import AvgPoolKernel, SpatialKernel, prod
from cnnkit.dense.rules import input_info, pointwise, register_module, spatial
from cnnkit.dense.rules_window import _max_pool
from cnnkit.layers.contrast_norm import LocalContrastNorm1d, LocalContrastNorm2d, local_contrast_norm
from cnnkit.layers.pooling import AvgPool1d, AvgPool2d, ChannelMaxPool, MaxPool1d, MaxPool2d


@register_module(MaxPool1d, MaxPool2d)
def _cnnkit_max_pool(cv, node, m):
    return _max_pool(cv, node, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


@register_module(AvgPool1d, AvgPool2d)
def _cnnkit_avg_pool(cv, node, m):
    """A dilated average pool: its own dilation multiplies the dense one (taps d * dilation apart)."""
    k = tuple(m.kernel_size)
    return spatial(cv, node, lambda a, kw: AvgPoolKernel(k, 1.0 / prod(k)), kernel=k, stride=m.stride,
                   dilation=m.dilation, padding=m.padding, ceil_mode=m.ceil_mode, label="avg-pool")


@register_module(ChannelMaxPool)
def _channel_max_pool(cv, node, m):
    """Max over groups of feature maps at one position: unchanged in the dense net."""
    if m.return_indices:
        cv.refuse(node, "channel max-pooling with return_indices")
    return pointwise(cv, node, m, f"channel max-pool /{m.group_size}")


class LCNKernel(SpatialKernel):
    """Valid-mode LCN at dense dilation r: the Gaussian window's taps r apart (Algorithm 1)."""

    def __init__(self, module):
        self.module = module
        # two window passes (mean, then deviation): the output at i reads inputs i .. i + 2 (k - 1) d
        self.kernel = tuple(2 * k - 1 for k in module.kernel_size)

    def run(self, t: torch.Tensor, r) -> torch.Tensor:
        m = self.module
        window = m.window(t.dtype, t.device)
        return local_contrast_norm(t, window, across_channels=m.across_channels, c=m.c, padding="valid",
                                   dilation=tuple(r), eps=m.eps)


@register_module(LocalContrastNorm1d, LocalContrastNorm2d)
def _lcn(cv, node, m):
    if input_info(cv, node).kind != "map":
        cv.refuse(node, "LCN on a flattened vector")
    if m.padding != "valid":
        cv.refuse(node, "LCN with padding='same' normalises the patch's border by the window part inside "
                  "the patch, which has no dense form; use padding='valid'")
    if m.c == "mean":
        cv.refuse(node, "LCN with c='mean' divides by the mean deviation over the whole patch map; "
                  "pass a number for c (e.g. c=1.0)")
    return spatial(cv, node, lambda a, kw: LCNKernel(m), kernel=tuple(2 * k - 1 for k in m.kernel_size),
                   stride=1, dilation=m.dilation, label="LCN")
