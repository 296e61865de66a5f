"""LeNet-5, simplified: Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning applied to
document recognition", Proc. IEEE 86(11), 1998, Sec. II-B and Fig. 2. The paper's own net, with
every one of the details below, is ``lenet5_1998`` (lenet1998.py).

32 x 32 input; C1 6@5x5 -> S2 -> C3 16@5x5 -> S4 -> C5 120@5x5 -> F6 84 -> output.
Deviations from the paper, stated:
- C3 connects to all 6 S2 maps (the paper's Table I connects each C3 map to a subset of them);
- S2/S4 are plain 2x2 average pooling (the paper multiplies by a trainable coefficient and adds a bias);
- tanh (the paper uses 1.7159 tanh(2x/3), Sec. II-B and Appendix A);
- the output layer is linear (the paper uses Euclidean RBF units with fixed parameters, eq. 7);
- PyTorch's default initialisation (the paper's, Appendix A, is uniform in +-2.4 / fan-in);
- an optional dropout before the output layer (``dropout``; the paper has none).
With these, the parameter count is 61,706 (the paper's net: 60,000).
"""

from __future__ import annotations

from torch import nn

from cnnkit.models.base import ClassifierNet
from cnnkit.models.registry import register_model


@register_model(
    "lenet5",
    paper="LeCun, Bottou, Bengio, Haffner. Gradient-based learning applied to document recognition. "
    "Proc. IEEE 1998",
    input_size=(1, 32, 32),
    num_classes=10,
    pooling="floor",
    normalisation="none",
    reference_params=61_706,
    notes="simplified: full C3, average-pool subsampling, tanh, linear output (lenet5_1998 is the paper's)",
)
def lenet5(num_classes: int = 10, in_chans: int = 1, dropout: float = 0.0) -> ClassifierNet:
    features = nn.Sequential()
    features.add_module("c1", nn.Conv2d(in_chans, 6, 5))  # (B, 6, 28, 28)
    features.add_module("tanh1", nn.Tanh())
    features.add_module("s2", nn.AvgPool2d(2))  # (B, 6, 14, 14)
    features.add_module("c3", nn.Conv2d(6, 16, 5))  # (B, 16, 10, 10)
    features.add_module("tanh3", nn.Tanh())
    features.add_module("s4", nn.AvgPool2d(2))  # (B, 16, 5, 5)
    features.add_module("c5", nn.Conv2d(16, 120, 5))  # (B, 120, 1, 1)
    features.add_module("tanh5", nn.Tanh())
    classifier = nn.Sequential()
    classifier.add_module("flatten", nn.Flatten())
    classifier.add_module("f6", nn.Linear(120, 84))
    classifier.add_module("tanh6", nn.Tanh())
    if dropout > 0:
        classifier.add_module("drop6", nn.Dropout(dropout))
    classifier.add_module("output", nn.Linear(84, num_classes))
    return ClassifierNet(features, classifier, (in_chans, 32, 32))
