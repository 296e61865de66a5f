"""ZF net / Clarifai: M. D. Zeiler, R. Fergus, "Visualizing and understanding convolutional networks",
ECCV 2014 (arXiv:1311.2901, Figure 3); the basis of Clarifai's ILSVRC 2013 winning entry.

AlexNet with conv1 changed from 11x11 stride 4 to 7x7 stride 2 (the lecture: "increasing resolution
of feature maps"), conv2 with stride 2, and no split over two GPUs (ungrouped conv2/4/5).
Figure 3's sizes: 224 -> conv1 110 -> pool1 55 -> conv2 26 -> pool2 13 -> conv3..5 13 -> pool5 6.

Deviations and choices, stated (the paper gives kernel, stride and map sizes but not the padding):
- conv1 pads by 1 and pooling uses ceil mode (cuda-convnet's pooling, on which the authors' code was
  built, covers the whole map): the only simple choice that reproduces every map size of Figure 3;
- "contrast normalisation across feature maps" is LRN with the AlexNet paper's constants;
- order: conv -> ReLU -> max pool -> normalise, as Figure 3's caption says ("(i) passed through a
  rectified linear function ..., (ii) pooled ... and (iii) contrast normalized"): the opposite of AlexNet's
  normalise-then-pool. ``lrn_order="norm_pool"`` (alexnet's option, same name and values) gives
  AlexNet's order for comparison. The order changes no parameter count or map size, only the values:
  normalising after pooling runs on 4x fewer positions and normalises the pooled responses.
- conv3/conv4 have 384 maps and conv5 256, as in Figure 3;
- weights use PyTorch's default initialisation, not the paper's (Sec. 3.1: all weights 10^-2, biases
  0), and the renormalisation of conv filters whose RMS exceeds 10^-1 (Sec. 3.1) is not applied.
With these, 62,357,608 parameters (the paper does not print a total).
"""

from __future__ import annotations

from cnnkit.models.alexnet import LRN_PAPER
from cnnkit.models.base import ClassifierNet
from cnnkit.models.blocks import Conv, conv_stack, fc_head, feature_shape, flat_size, lrn_factory
from cnnkit.models.registry import register_model

PAPER = "Zeiler, Fergus. Visualizing and understanding convolutional networks. ECCV 2014"

ZFNET = [
    #    filters size stride pad  LRN        pool 3x3/2 (ceil), before the LRN
    Conv(96,  7, 2, 1, lrn=True, pool=(3, 2)),   # conv1 -> 96 x 110 x 110 -> 55 x 55
    Conv(256, 5, 2, 0, lrn=True, pool=(3, 2)),   # conv2 -> 256 x 26 x 26 -> 13 x 13
    Conv(384, 3, 1, 1),                          # conv3 -> 384 x 13 x 13
    Conv(384, 3, 1, 1),                          # conv4
    Conv(256, 3, 1, 1, pool=(3, 2)),             # conv5 -> 256 x 13 x 13 -> 6 x 6
]


@register_model(
    "zfnet", paper=PAPER, input_size=(3, 224, 224), pooling="ceil", normalisation=LRN_PAPER,
    reference_params=62_357_608,
    notes="conv1 pad 1 and ceil-mode pooling chosen to give Figure 3's sizes (paper omits padding); "
          "pool before normalisation (Figure 3)",
)
def zfnet(num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5,
          lrn_convention: str = "paper", lrn_order: str = "pool_norm") -> ClassifierNet:
    features = conv_stack(ZFNET, in_chans, pooling="ceil", lrn=lrn_factory(lrn_convention), lrn_order=lrn_order)
    input_size = (in_chans, 224, 224)
    classifier = fc_head(flat_size(feature_shape(features, input_size)), [4096, 4096], num_classes, dropout)
    return ClassifierNet(features, classifier, input_size)
