"""The lecture's layers (see each module's docstring for the formula and its source).

=========================================  ==========================================================
lecture                                    cnnkit.layers
=========================================  ==========================================================
locally connected, no weight sharing       ``LocallyConnected1d``, ``LocallyConnected2d``
locally shared weights                     ``TiledConv1d``, ``TiledConv2d`` (regions or Ngiam tiles)
local contrast normalisation               ``LocalContrastNorm1d/2d``, ``local_contrast_norm``
local response normalisation (AlexNet)     ``LocalResponseNorm(convention="paper" | "caffe")``
pooling (max, average; stride, dilation)   ``MaxPool1d/2d``, ``AvgPool1d/2d`` (dilated average pooling)
pooling over separately parameterised      ``ChannelMaxPool``
filters (learned invariance)
CNN in the frequency domain                ``FFTConv1d``, ``FFTConv2d``, ``fft_conv``
=========================================  ==========================================================
"""

from cnnkit.layers.contrast_norm import (
    LocalContrastNorm1d,
    LocalContrastNorm2d,
    gaussian_window,
    local_contrast_norm,
)
from cnnkit.layers.fft_conv import FFTConv1d, FFTConv2d, fft_conv
from cnnkit.layers.locally_connected import LocallyConnected1d, LocallyConnected2d, TiledConv1d, TiledConv2d
from cnnkit.layers.lrn import LocalResponseNorm
from cnnkit.layers.pooling import (
    AvgPool1d,
    AvgPool2d,
    ChannelMaxPool,
    MaxPool1d,
    MaxPool2d,
    avg_pool,
    channel_max_pool,
    max_pool,
)

__all__ = [
    "AvgPool1d",
    "AvgPool2d",
    "ChannelMaxPool",
    "FFTConv1d",
    "FFTConv2d",
    "LocalContrastNorm1d",
    "LocalContrastNorm2d",
    "LocalResponseNorm",
    "LocallyConnected1d",
    "LocallyConnected2d",
    "MaxPool1d",
    "MaxPool2d",
    "TiledConv1d",
    "TiledConv2d",
    "avg_pool",
    "channel_max_pool",
    "fft_conv",
    "gaussian_window",
    "local_contrast_norm",
    "max_pool",
]
