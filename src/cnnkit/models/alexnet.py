"""AlexNet: A. Krizhevsky, I. Sutskever, G. E. Hinton, "ImageNet classification with deep
convolutional neural networks", NIPS 2012 (Section 3, Figure 2).

As published: five conv layers and three FC layers; the network is split over two GPUs, so conv2,
conv4 and conv5 only see the 48 (conv2) or 192 (conv4, conv5) maps of their own GPU: grouped
convolutions with 2 groups; conv3 and the FC layers connect across both. ReLU after every layer,
LRN (n=5, alpha=1e-4, beta=0.75, k=2, alpha per neighbour as in the paper's formula) after the
ReLUs of conv1 and conv2, overlapping max pooling 3x3/2 after the LRNs and after conv5, dropout 0.5
in fc6 and fc7. 60,965,224 parameters.

Deviations and choices, stated:
- input 227 x 227: the paper says 224, but 11x11 stride-4 filters without padding give 55 x 55 maps
  (its Figure 2) only from 227 = 4 * 54 + 11;
- ``groups=1`` builds the same widths on one device (62,378,344 parameters), the usual single-GPU
  reading (torchvision's AlexNet is a later, different "one weird trick" variant without LRN);
- ``lrn_convention="caffe"`` reads alpha as Caffe does (divided by n; BVLC's reference models);
  ``lrn_order="pool_norm"`` pools before normalising (CaffeNet's order);
- weights use PyTorch's default initialisation, not the paper's N(0, 0.01) with unit biases.

The lecture lists the neurons per layer as 253440, 186624, 64896, 64896, 43264, 4096, 4096, 1000;
the first does not add up: conv1 has 55 * 55 * 96 = 290,400 outputs, while 253,440 = 48 * 55 * 96
(one 55 replaced by the per-GPU filter count 48). The other seven are exact. ``LECTURE_NEURONS``
keeps the lecture's numbers so that ``cnnkit summary alexnet`` shows them beside the computed ones.
"""

from __future__ import annotations

from cnnkit.models.base import ClassifierNet
from cnnkit.models.blocks import Conv, conv_stack, fc_head, feature_shape, flat_size, lrn_factory
from cnnkit.models.registry import register_model

PAPER = ("Krizhevsky, Sutskever, Hinton. ImageNet classification with deep convolutional neural "
         "networks. NIPS 2012")

# Figure 2 of the paper; G marks the layers split over the two GPUs (groups=2).
G = 2
ALEXNET = [
    #    filters  size stride pad groups  LRN        pool 3x3/2
    Conv(96,  11, 4, 0, 1, lrn=True, pool=(3, 2)),   # conv1 -> 96 x 55 x 55
    Conv(256,  5, 1, 2, G, lrn=True, pool=(3, 2)),   # conv2 -> 256 x 27 x 27
    Conv(384,  3, 1, 1, 1),                          # conv3 -> 384 x 13 x 13
    Conv(384,  3, 1, 1, G),                          # conv4
    Conv(256,  3, 1, 1, G, pool=(3, 2)),             # conv5 -> 256 x 13 x 13, pooled to 6 x 6
]
FC = [4096, 4096]

LECTURE_NEURONS = {"conv1": 253_440, "conv2": 186_624, "conv3": 64_896, "conv4": 64_896,
                   "conv5": 43_264, "fc6": 4_096, "fc7": 4_096, "fc8": 1_000}

LRN_PAPER = "LRN paper n=5 alpha=1e-4 beta=0.75 k=2"


@register_model(
    "alexnet", paper=PAPER, input_size=(3, 227, 227), pooling="floor", normalisation=LRN_PAPER,
    reference_params=60_965_224,
    notes="two groups in conv2/4/5 (two GPUs); input 227 (paper says 224); default PyTorch init",
)
def alexnet(num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5, groups: int = 2,
            lrn_convention: str = "paper", lrn_order: str = "norm_pool") -> ClassifierNet:
    """AlexNet 2012; ``groups=1`` for the ungrouped single-device version."""
    table = [Conv(c.out, c.kernel, c.stride, c.pad, groups if c.groups > 1 else 1, c.lrn, c.pool)
             for c in ALEXNET]
    features = conv_stack(table, in_chans, lrn=lrn_factory(lrn_convention), lrn_order=lrn_order)
    input_size = (in_chans, 227, 227)
    classifier = fc_head(flat_size(feature_shape(features, input_size)), FC, num_classes, dropout)
    return ClassifierNet(features, classifier, input_size)
