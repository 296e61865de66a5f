"""Network in Network (ImageNet): M. Lin, Q. Chen, S. Yan, "Network in network", ICLR 2014
(arXiv:1312.4400v3); the ImageNet model the authors released in the Caffe model zoo, which the
lecture describes: AlexNet's conv layers, each followed by two 1x1 convolutions ("cccp", the
mlpconv layer), fc6/fc7 removed, and global average pooling over one map per class.

    conv1 96 11x11/4, cccp1 96, cccp2 96, max pool 3x3/2      224 -> 54 -> 27
    conv2 256 5x5 pad 2, cccp3 256, cccp4 256, max pool 3x3/2  27 -> 13
    conv3 384 3x3 pad 1, cccp5 384, cccp6 384, max pool 3x3/2, dropout 0.5   13 -> 6
    conv4 1024 3x3 pad 1, cccp7 1024, cccp8 1000, average pool 6x6/1         6 -> 1

Stated choices and deviations: input 224 x 224; ceil-mode pooling as in Caffe (floor mode would end
in 5 x 5 maps and the 6x6 global average would not fit); ungrouped convolutions; the released model
applies a ReLU to the class maps before averaging (kept; ``final_relu=False`` drops it). No LRN.
7,595,176 parameters (the lecture: "7.5 million").

``features`` ends after cccp7 (1024 x 6 x 6); the head is cccp8 + global average pooling, so
``reset_classifier`` replaces cccp8 and the model is already fully convolutional.
"""

from __future__ import annotations

from torch import nn

from cnnkit.models.base import ClassifierNet
from cnnkit.models.registry import register_model

PAPER = "Lin, Chen, Yan. Network in network. ICLR 2014"

# mlpconv blocks: (filters, kernel, stride, pad) of the conv, widths of the two 1x1 convs that follow
BLOCKS = [
    ((96, 11, 4, 0), (96, 96)),
    ((256, 5, 1, 2), (256, 256)),
    ((384, 3, 1, 1), (384, 384)),
    ((1024, 3, 1, 1), (1024, None)),  # cccp8 (one map per class) belongs to the head
]


@register_model(
    "nin", paper=PAPER, input_size=(3, 224, 224), pooling="ceil", normalisation="none",
    reference_params=7_595_176,
    notes="released Caffe ImageNet model; ceil-mode pooling; ReLU before global average pooling",
)
def nin(num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5,
        final_relu: bool = True) -> ClassifierNet:
    features = nn.Sequential()
    c, cccp = in_chans, 1
    for block, ((out, k, s, p), widths) in enumerate(BLOCKS, start=1):
        features.add_module(f"conv{block}", nn.Conv2d(c, out, k, s, p))
        features.add_module(f"relu{block}", nn.ReLU(inplace=True))
        c = out
        for j, width in enumerate(widths, start=1):
            if width is None:
                continue
            features.add_module(f"cccp{cccp}", nn.Conv2d(c, width, 1))
            features.add_module(f"relu{block}_{j}", nn.ReLU(inplace=True))
            c, cccp = width, cccp + 1
        if block < len(BLOCKS):
            features.add_module(f"pool{block}", nn.MaxPool2d(3, 2, ceil_mode=True))
        if block == 3 and dropout > 0:
            features.add_module("drop3", nn.Dropout(dropout))
    classifier = nn.Sequential()
    classifier.add_module(f"cccp{cccp}", nn.Conv2d(c, num_classes, 1))  # cccp8: one map per class
    if final_relu:
        classifier.add_module(f"relu{len(BLOCKS)}_2", nn.ReLU(inplace=True))
    classifier.add_module(f"pool{len(BLOCKS)}", nn.AvgPool2d(6, 1))  # (B, K, 6, 6) -> (B, K, 1, 1)
    classifier.add_module("flatten", nn.Flatten())
    return ClassifierNet(features, classifier, (in_chans, 224, 224))
