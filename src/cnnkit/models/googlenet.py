"""GoogLeNet: C. Szegedy, W. Liu, Y. Jia, P. Sermanet, S. Reed, D. Anguelov, D. Erhan, V. Vanhoucke,
A. Rabinovich, "Going deeper with convolutions", CVPR 2015 (arXiv:1409.4842), Table 1, Figures 2(b)
and 3, Section 5 (auxiliary classifiers).

As published: the 5x5 branch has 5x5 kernels (torchvision's GoogLeNet uses 3x3 there, and batch
norm), every convolution is followed by a ReLU, the pooling branch is max pool 3x3/1 then a 1x1
projection, the head is avg pool 7x7/1, dropout 40% and a linear layer. 224 x 224 input.
6,998,552 parameters without the auxiliary classifiers.

Auxiliary classifiers (``aux_logits=True``) on inception (4a) and (4d), as Section 5: avg pool 5x5/3,
1x1 conv with 128 filters, FC 1024, dropout 70%, linear. In training mode ``forward`` then returns
``(main, aux1, aux2)``; the paper weights the auxiliary losses by 0.3. In eval mode, and in the
fully convolutional copy, they are not used.

Choices the paper leaves open, stated (taken from the authors' BVLC Caffe model): ceil-mode pooling
(Caffe's rule; needed for Table 1's sizes 112 -> 56 -> 28 -> 14 -> 7); LRN after pool1 and after
conv2, with Caffe's constants n=5, alpha=1e-4 (divided by n, Caffe convention), beta=0.75, k=1.

``TABLE1`` keeps the paper's "params" (weights without biases, in units of 1024) and "ops"
(multiply-adds, in millions) per row, so that ``cnnkit summary googlenet`` prints them beside the
computed ones. Several rows do not add up; see ``tests/test_zoo.py`` for the list.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from cnnkit.models.base import ClassifierNet, replace_last_layer
from cnnkit.models.blocks import lrn_factory
from cnnkit.models.registry import register_model

PAPER = ("Szegedy, Liu, Jia, Sermanet, Reed, Anguelov, Erhan, Vanhoucke, Rabinovich. Going deeper "
         "with convolutions. CVPR 2015")

# Table 1:          #1x1 #3x3 reduce #3x3 #5x5 reduce #5x5 pool proj
INCEPTION = {
    "3a": (64,  96,  128, 16, 32,  32),
    "3b": (128, 128, 192, 32, 96,  64),
    "4a": (192, 96,  208, 16, 48,  64),
    "4b": (160, 112, 224, 24, 64,  64),
    "4c": (128, 128, 256, 24, 64,  64),
    "4d": (112, 144, 288, 32, 64,  64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}

# Table 1's last two columns as printed: params (K = 1024 weights, biases not counted), ops (M MACs).
TABLE1 = {
    "conv1": (2.7, 34), "conv2": (112, 360),
    "inception_3a": (159, 128), "inception_3b": (380, 304),
    "inception_4a": (364, 73), "inception_4b": (437, 88), "inception_4c": (463, 100),
    "inception_4d": (580, 119), "inception_4e": (840, 170),
    "inception_5a": (1072, 54), "inception_5b": (1388, 71),
    "fc": (1000, 1),
}

LRN_CAFFE = "LRN caffe n=5 alpha=1e-4 beta=0.75 k=1"


def _relu() -> nn.ReLU:
    return nn.ReLU(inplace=True)  # in place, as the Caffe model; extract_features copies outputs


def _conv_relu(c_in: int, c_out: int, k: int, stride: int = 1, pad: int = 0) -> list[tuple[str, nn.Module]]:
    return [("conv", nn.Conv2d(c_in, c_out, k, stride, pad)), ("relu", _relu())]


def _seq(*named: tuple[str, nn.Module]) -> nn.Sequential:
    seq = nn.Sequential()
    for name, m in named:
        seq.add_module(name, m)
    return seq


class Inception(nn.Module):
    """Figure 2(b): 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | max pool 3x3/1 -> 1x1, concatenated on channels."""

    def __init__(self, c_in: int, n1x1: int, n3x3red: int, n3x3: int, n5x5red: int, n5x5: int,
                 pool_proj: int):
        super().__init__()
        self.b1x1 = _seq(*_conv_relu(c_in, n1x1, 1))
        self.b3x3 = _seq(("reduce", nn.Conv2d(c_in, n3x3red, 1)), ("relu_reduce", _relu()),
                         *_conv_relu(n3x3red, n3x3, 3, pad=1))
        self.b5x5 = _seq(("reduce", nn.Conv2d(c_in, n5x5red, 1)), ("relu_reduce", _relu()),
                         *_conv_relu(n5x5red, n5x5, 5, pad=2))
        self.pool_proj = _seq(("pool", nn.MaxPool2d(3, 1, 1, ceil_mode=True)),
                              *_conv_relu(c_in, pool_proj, 1))
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b1x1(x), self.b3x3(x), self.b5x5(x), self.pool_proj(x)]
        return torch.cat(branches, 1)  # (B, n1x1 + n3x3 + n5x5 + pool_proj, H, W)


class AuxHead(nn.Module):
    """Section 5: avg pool 5x5/3 -> 1x1 conv 128 -> FC 1024 -> dropout 70% -> linear."""

    def __init__(self, c_in: int, num_classes: int):
        super().__init__()
        self.layers = _seq(
            ("pool", nn.AvgPool2d(5, 3, ceil_mode=True)),  # (B, C, 14, 14) -> (B, C, 4, 4)
            *_conv_relu(c_in, 128, 1), ("flatten", nn.Flatten()),
            ("fc", nn.Linear(128 * 4 * 4, 1024)), ("relu_fc", _relu()), ("drop", nn.Dropout(0.7)),
            ("classifier", nn.Linear(1024, num_classes)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GoogLeNet(ClassifierNet):
    """``features`` up to inception (5b) (1024 x 7 x 7), ``classifier`` = avg pool, dropout, linear."""

    AUX_AFTER = ("inception_4a", "inception_4d")

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.4,
                 aux_logits: bool = False, lrn_convention: str = "caffe"):
        lrn = lrn_factory(lrn_convention, 5, 1e-4, 0.75, 1.0)
        pool = partial(nn.MaxPool2d, 3, 2, ceil_mode=True)
        features = _seq(
            ("conv1", nn.Conv2d(in_chans, 64, 7, 2, 3)), ("relu1", _relu()),  # (B, 64, 112, 112)
            ("pool1", pool()), ("norm1", lrn()),                                 # (B, 64, 56, 56)
            ("conv2", _seq(("reduce", nn.Conv2d(64, 64, 1)), ("relu_reduce", _relu()),
                           *_conv_relu(64, 192, 3, pad=1))),                    # (B, 192, 56, 56)
            ("norm2", lrn()), ("pool2", pool()),                                 # (B, 192, 28, 28)
        )
        c = 192
        for stage in INCEPTION:
            if stage in ("4a", "5a"):
                features.add_module(f"pool{int(stage[0]) - 1}", pool())  # 28 -> 14, 14 -> 7
            block = Inception(c, *INCEPTION[stage])
            features.add_module(f"inception_{stage}", block)
            c = block.out_channels
        classifier = _seq(
            ("pool5", nn.AvgPool2d(7, 1)),  # (B, 1024, 7, 7) -> (B, 1024, 1, 1); larger inputs give a map
            ("drop", nn.Dropout(dropout)), ("flatten", nn.Flatten()), ("fc", nn.Linear(c, num_classes)),
        )
        super().__init__(features, classifier, (in_chans, 224, 224))
        self.aux_logits = aux_logits
        self.aux1 = AuxHead(512, num_classes) if aux_logits else None
        self.aux2 = AuxHead(528, num_classes) if aux_logits else None

    def forward(self, x: torch.Tensor):
        if not (self.aux_logits and self.training):
            return super().forward(x)
        aux = []
        for name, m in self.features.named_children():
            x = m(x)
            if name in self.AUX_AFTER:
                aux.append((self.aux1, self.aux2)[len(aux)](x))
        return self.forward_head(x), aux[0], aux[1]

    def reset_classifier(self, num_classes: int) -> None:
        super().reset_classifier(num_classes)
        for head in (self.aux1, self.aux2):
            if head is not None:
                replace_last_layer(head, num_classes)

    def to_fully_convolutional(self) -> nn.Module:
        """The final linear layer becomes a 1x1 conv after the avg pool 7x7/1 (stride 1), so larger
        images give a map of scores; the auxiliary heads (training only) are dropped."""
        model = super().to_fully_convolutional()
        model.aux_logits, model.aux1, model.aux2 = False, None, None
        return model


@register_model(
    "googlenet", paper=PAPER, input_size=(3, 224, 224), pooling="ceil", normalisation=LRN_CAFFE,
    reference_params=6_998_552,
    notes="5x5 branch as published; aux classifiers optional (aux_logits=True); ceil-mode pooling",
)
def googlenet(num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.4, aux_logits: bool = False,
              lrn_convention: str = "caffe") -> GoogLeNet:
    return GoogLeNet(num_classes, in_chans, dropout, aux_logits, lrn_convention)
