"""VGG: K. Simonyan, A. Zisserman, "Very deep convolutional networks for large-scale image
recognition", ICLR 2015 (arXiv:1409.1556), Table 1 (configurations A, A-LRN, B, C, D, E).

``CFGS`` is Table 1 read column by column: a number is a conv3 layer with that many filters,
``(n, 1)`` a conv1 layer (configuration C), ``"LRN"`` the local response normalisation of A-LRN and
``"M"`` a 2x2/2 max pooling. All convolutions have stride 1 and "same" padding; ReLU after each;
then FC-4096, FC-4096 with dropout 0.5 and FC-1000. Input 224 x 224.
Layer names follow the authors' released Caffe models: conv1_1 .. conv5_3, pool1 .. pool5, fc6 .. fc8.
LRN constants as in Krizhevsky et al., as the paper says. Parameters: A 132,863,336, A-LRN the same,
B 133,047,848, C 133,638,952, D 138,357,544, E 143,667,240.

Deviation, stated: the initialisation. Sec. 3.1 trains net A from random weights (normal, zero mean,
variance 10^-2; biases 0) and starts the deeper nets from A's first four conv layers and three FC
layers (the rest random); it adds that Glorot & Bengio's initialisation, found after submission,
works without this pre-training. Here every configuration uses PyTorch's default initialisation
(weights and biases uniform in +-1/sqrt(fan_in)), and no net is initialised from another.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from cnnkit.models.alexnet import LRN_PAPER
from cnnkit.models.base import ClassifierNet
from cnnkit.models.blocks import fc_head, feature_shape, flat_size, lrn_factory
from cnnkit.models.registry import register_model

PAPER = ("Simonyan, Zisserman. Very deep convolutional networks for large-scale image recognition. "
         "ICLR 2015")

CFGS: dict[str, list] = {
    "a":     [64,              "M", 128,      "M", 256, 256,                "M", 512, 512,                "M", 512, 512,                "M"],  # noqa: E501
    "a_lrn": [64, "LRN",       "M", 128,      "M", 256, 256,                "M", 512, 512,                "M", 512, 512,                "M"],  # noqa: E501
    "b":     [64, 64,          "M", 128, 128, "M", 256, 256,                "M", 512, 512,                "M", 512, 512,                "M"],  # noqa: E501
    "c":     [64, 64,          "M", 128, 128, "M", 256, 256, (256, 1),      "M", 512, 512, (512, 1),      "M", 512, 512, (512, 1),      "M"],  # noqa: E501
    "d":     [64, 64,          "M", 128, 128, "M", 256, 256, 256,           "M", 512, 512, 512,           "M", 512, 512, 512,           "M"],  # noqa: E501
    "e":     [64, 64,          "M", 128, 128, "M", 256, 256, 256, 256,      "M", 512, 512, 512, 512,      "M", 512, 512, 512, 512,      "M"],  # noqa: E501
}
REFERENCE_PARAMS = {"a": 132_863_336, "a_lrn": 132_863_336, "b": 133_047_848, "c": 133_638_952,
                    "d": 138_357_544, "e": 143_667_240}
WEIGHT_LAYERS = {"a": 11, "a_lrn": 11, "b": 13, "c": 16, "d": 16, "e": 19}


def make_layers(cfg: list, in_chans: int = 3, lrn_convention: str = "paper") -> nn.Sequential:
    """Turn one column of Table 1 into ``conv{block}_{i}``, ``relu{block}_{i}``, ``pool{block}``."""
    seq = nn.Sequential()
    block, i, c = 1, 1, in_chans
    for v in cfg:
        if v == "M":
            seq.add_module(f"pool{block}", nn.MaxPool2d(2, 2))
            block, i = block + 1, 1
        elif v == "LRN":
            seq.add_module(f"norm{block}", lrn_factory(lrn_convention)())
        else:
            out, k = v if isinstance(v, tuple) else (v, 3)
            seq.add_module(f"conv{block}_{i}", nn.Conv2d(c, out, k, padding=k // 2))
            seq.add_module(f"relu{block}_{i}", nn.ReLU(inplace=True))
            i, c = i + 1, out
    return seq


def vgg(cfg: str, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5,
        lrn_convention: str = "paper") -> ClassifierNet:
    """Configuration ``cfg`` of Table 1 (``"a"``, ``"a_lrn"``, ``"b"``, ``"c"``, ``"d"``, ``"e"``)."""
    features = make_layers(CFGS[cfg], in_chans, lrn_convention)
    input_size = (in_chans, 224, 224)
    classifier = fc_head(flat_size(feature_shape(features, input_size)), [4096, 4096], num_classes, dropout)
    return ClassifierNet(features, classifier, input_size)


for _cfg in CFGS:
    register_model(
        f"vgg_{_cfg}", paper=PAPER, input_size=(3, 224, 224), pooling="floor",
        normalisation=LRN_PAPER if "LRN" in CFGS[_cfg] else "none",
        reference_params=REFERENCE_PARAMS[_cfg],
        notes=f"configuration {_cfg.upper().replace('_', '-')}, {WEIGHT_LAYERS[_cfg]} weight layers",
    )(partial(vgg, _cfg))
