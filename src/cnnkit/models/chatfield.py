"""CNN-F, CNN-M, CNN-S and CNN-M-2048/1024/128: K. Chatfield, K. Simonyan, A. Vedaldi, A. Zisserman,
"Return of the devil in the details: delving deep into convolutional nets", BMVC 2014
(arXiv:1405.3531), Table 1 and Section 4; the lecture reproduces the table.

``ARCHS`` below is that table: one row per architecture, one ``Conv`` per column conv1..conv5,
then full6, full7. "x2 pool" is max pooling with downsampling factor 2: 3x3/2 windows, except
CNN-S's conv2 (2x2/2); "x3 pool" is 3x3/3. Input 224 x 224, dropout in full6 and full7.

Choices the paper leaves open, stated (taken from the authors' released Caffe models):
- pooling windows as above, and ceil-mode pooling (Caffe's rule): with floor mode CNN-M and CNN-S
  end in 5 x 5 instead of 6 x 6 maps and the parameter counts below no longer hold;
  map sizes: CNN-F 54-27-27-13-13-6, CNN-M 109-54-26-13-13-6, CNN-S 109-37-35-18-18-6
  (conv1, pool1, conv2, pool2, conv5, pool5);
- LRN as in AlexNet (Caffe's local_size 5, alpha 5e-4, beta 0.75, k 2: alpha per neighbour 1e-4),
  placed after the ReLU and before pooling;
- no grouped convolutions (the networks were trained on one GPU).
Parameters: CNN-F 60,834,536; CNN-M and CNN-S 102,908,520; CNN-M-2048 92,469,864;
CNN-M-1024 87,250,536; CNN-M-128 82,683,624. Weights use PyTorch's default initialisation.
"""

from __future__ import annotations

from functools import partial

from cnnkit.models.alexnet import LRN_PAPER
from cnnkit.models.base import ClassifierNet
from cnnkit.models.blocks import Conv, conv_stack, fc_head, feature_shape, flat_size, lrn_factory
from cnnkit.models.registry import register_model

PAPER = ("Chatfield, Simonyan, Vedaldi, Zisserman. Return of the devil in the details: delving deep "
         "into convolutional nets. BMVC 2014")

x2, x3, s2 = (3, 2), (3, 3), (2, 2)  # the table's "x2 pool" / "x3 pool"; CNN-S pool2 is 2x2/2

#              conv1                                  conv2                                  conv3               conv4               conv5                        full6 full7  # noqa: E501
ARCHS = {
    "cnn_f": ([Conv(64, 11, 4, 0, lrn=True, pool=x2), Conv(256, 5, 1, 2, lrn=True, pool=x2), Conv(256, 3, 1, 1), Conv(256, 3, 1, 1), Conv(256, 3, 1, 1, pool=x2)], 4096, 4096),  # noqa: E501
    "cnn_m": ([Conv(96, 7, 2, 0, lrn=True, pool=x2),  Conv(256, 5, 2, 1, lrn=True, pool=x2), Conv(512, 3, 1, 1), Conv(512, 3, 1, 1), Conv(512, 3, 1, 1, pool=x2)], 4096, 4096),  # noqa: E501
    "cnn_s": ([Conv(96, 7, 2, 0, lrn=True, pool=x3),  Conv(256, 5, 1, 1, pool=s2),           Conv(512, 3, 1, 1), Conv(512, 3, 1, 1), Conv(512, 3, 1, 1, pool=x3)], 4096, 4096),  # noqa: E501
}
# Section 4.3 of the paper: CNN-M with a narrower full7 (the feature used for retrieval/transfer).
for _width in (2048, 1024, 128):
    ARCHS[f"cnn_m_{_width}"] = (ARCHS["cnn_m"][0], 4096, _width)

REFERENCE_PARAMS = {"cnn_f": 60_834_536, "cnn_m": 102_908_520, "cnn_s": 102_908_520,
                    "cnn_m_2048": 92_469_864, "cnn_m_1024": 87_250_536, "cnn_m_128": 82_683_624}
NOTES = {"cnn_f": "fast, similar to AlexNet", "cnn_m": "medium, similar to Clarifai/ZF",
         "cnn_s": "slow, similar to OverFeat accurate"}


def chatfield(arch: str, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5,
              lrn_convention: str = "paper") -> ClassifierNet:
    """Build row ``arch`` of ``ARCHS`` (``"cnn_f"``, ``"cnn_m"``, ``"cnn_s"``, ``"cnn_m_2048"``, ...)."""
    table, full6, full7 = ARCHS[arch]
    features = conv_stack(table, in_chans, pooling="ceil", lrn=lrn_factory(lrn_convention))
    input_size = (in_chans, 224, 224)
    classifier = fc_head(flat_size(feature_shape(features, input_size)), [full6, full7], num_classes, dropout)
    return ClassifierNet(features, classifier, input_size)


for _name in ARCHS:
    _note = NOTES.get(_name, f"CNN-M with full7 of {ARCHS[_name][2]} units")
    register_model(
        _name, paper=PAPER, input_size=(3, 224, 224), pooling="ceil", normalisation=LRN_PAPER,
        reference_params=REFERENCE_PARAMS[_name], notes=f"{_note}; ceil-mode pooling (Caffe)",
    )(partial(chatfield, _name))
