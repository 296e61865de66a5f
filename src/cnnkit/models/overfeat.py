"""OverFeat: P. Sermanet, D. Eigen, X. Zhang, M. Mathieu, R. Fergus, Y. LeCun, "OverFeat: Integrated
recognition, localization and detection using convolutional networks", ICLR 2014 (arXiv:1312.6229),
Table 1 (fast model) and Table 3 (accurate model).

Compared with AlexNet: no LRN, non-overlapping pooling, more filters in the upper layers
(the lecture: "384 => 512 for conv3 and 384 => 1024 for conv4/5") and, for the accurate model,
a sixth conv layer with stride 2 in conv1. Dropout 0.5 in the hidden FC layers.
Map sizes as in the tables: fast 231 -> 56 -> 28 -> 24 -> 12 -> 12 -> 12 -> 12 -> 6;
accurate 221 -> 108 -> 36 -> 30 -> 15 -> 15 -> 15 -> 15 -> 15 -> 5.
Layer names follow the paper's layer numbers: fast conv1..conv5, fc6..fc8; accurate conv1..conv6,
fc7..fc9. 145,920,872 (fast) and 144,656,488 (accurate) parameters.
The paper runs both fully convolutionally over larger images (``to_fully_convolutional``).

Deviation, stated: weights use PyTorch's default initialisation, not the paper's (Sec. 3.1: random,
mean 0, sigma 10^-2).
"""

from __future__ import annotations

from cnnkit.models.base import ClassifierNet
from cnnkit.models.blocks import Conv, conv_stack, fc_head, feature_shape, flat_size
from cnnkit.models.registry import register_model

PAPER = ("Sermanet, Eigen, Zhang, Mathieu, Fergus, LeCun. OverFeat: Integrated recognition, "
         "localization and detection using convolutional networks. ICLR 2014")

# Table 1 of the paper: the fast model, 231 x 231 input.
FAST = [
    #    filters size stride pad  pool
    Conv(96,   11, 4, 0, pool=(2, 2)),   # conv1 -> 96 x 56 x 56 -> 28 x 28
    Conv(256,   5, 1, 0, pool=(2, 2)),   # conv2 -> 256 x 24 x 24 -> 12 x 12
    Conv(512,   3, 1, 1),                # conv3 -> 512 x 12 x 12
    Conv(1024,  3, 1, 1),                # conv4 -> 1024 x 12 x 12
    Conv(1024,  3, 1, 1, pool=(2, 2)),   # conv5 -> 1024 x 12 x 12 -> 6 x 6
]
FAST_FC = [3072, 4096]

# Table 3 of the paper: the accurate model, 221 x 221 input.
ACCURATE = [
    Conv(96,    7, 2, 0, pool=(3, 3)),   # conv1 -> 96 x 108 x 108 -> 36 x 36
    Conv(256,   7, 1, 0, pool=(2, 2)),   # conv2 -> 256 x 30 x 30 -> 15 x 15
    Conv(512,   3, 1, 1),                # conv3 -> 512 x 15 x 15
    Conv(512,   3, 1, 1),                # conv4
    Conv(1024,  3, 1, 1),                # conv5 -> 1024 x 15 x 15
    Conv(1024,  3, 1, 1, pool=(3, 3)),   # conv6 -> 1024 x 15 x 15 -> 5 x 5
]
ACCURATE_FC = [4096, 4096]


def _overfeat(table, fc, size: int, num_classes: int, in_chans: int, dropout: float) -> ClassifierNet:
    features = conv_stack(table, in_chans)
    input_size = (in_chans, size, size)
    classifier = fc_head(flat_size(feature_shape(features, input_size)), fc, num_classes, dropout,
                         first=len(table) + 1)
    return ClassifierNet(features, classifier, input_size)


@register_model(
    "overfeat_fast", paper=PAPER, input_size=(3, 231, 231), pooling="floor", normalisation="none",
    reference_params=145_920_872, notes="Table 1 of the paper; default PyTorch init",
)
def overfeat_fast(num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5) -> ClassifierNet:
    return _overfeat(FAST, FAST_FC, 231, num_classes, in_chans, dropout)


@register_model(
    "overfeat_accurate", paper=PAPER, input_size=(3, 221, 221), pooling="floor", normalisation="none",
    reference_params=144_656_488, notes="Table 3 of the paper; layers conv1-6, fc7-9; default PyTorch init",
)
def overfeat_accurate(num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5) -> ClassifierNet:
    return _overfeat(ACCURATE, ACCURATE_FC, 221, num_classes, in_chans, dropout)
