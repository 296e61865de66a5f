"""Deep Image (Baidu): R. Wu, S. Yan, Y. Shan, Q. Dang, G. Sun, "Deep Image: Scaling up image
recognition", arXiv:1501.02876, 2015, Table 3 ("basic configuration for one single model"), as the
lecture reproduces it:

    Conv 1-2: 64, max pool, Conv 3-4: 128, max pool, Conv 5-6-7: 256, max pool,
    Conv 8-9-10: 512, max pool, Conv 11-12-13: 512, max pool, FC 1-2: 6144, FC 3: 1000, softmax.

That is VGG's configuration D with wider fully connected layers ("up to 8192").

What the sources leave open, and what is chosen here:
- kernel size, stride and padding of the convolutions: 3x3, stride 1, padding 1 (as VGG, whose
  layout the table copies);
- pooling window: 2x2/2 max pooling, floor mode (as VGG);
- input size: 224 x 224 (the paper also trains "high-resolution" models on 512 x 512 images:
  ``image_size=512`` builds that variant, whose FC 1 reads a 16 x 16 map);
- FC width: 6144 as in the table (``fc_width=8192`` for the widest variant the text mentions);
- no normalisation layers; dropout 0.5 after FC 1 and FC 2 (not stated; as AlexNet/VGG).
With these, at 224 x 224, 212,761,384 parameters (the paper prints no count).
Layers are numbered through the net as in the paper's "16 layers": conv1 .. conv13, then fc14, fc15
(the table's FC 1-2) and fc16 (FC 3); pooling layers are named after the conv they follow.
"""

from __future__ import annotations

from cnnkit.errors import ConfigError
from cnnkit.models.base import ClassifierNet
from cnnkit.models.blocks import Conv, conv_stack, fc_head, feature_shape, flat_size
from cnnkit.models.registry import register_model

PAPER = "Wu, Yan, Shan, Dang, Sun. Deep Image: Scaling up image recognition. arXiv:1501.02876, 2015"

P = (2, 2)
# Table 3 of the paper: filters per conv layer, a max pool after each group.
DEEP_IMAGE = [
    Conv(64, 3, 1, 1), Conv(64, 3, 1, 1, pool=P),                          # conv 1-2
    Conv(128, 3, 1, 1), Conv(128, 3, 1, 1, pool=P),                        # conv 3-4
    Conv(256, 3, 1, 1), Conv(256, 3, 1, 1), Conv(256, 3, 1, 1, pool=P),    # conv 5-6-7
    Conv(512, 3, 1, 1), Conv(512, 3, 1, 1), Conv(512, 3, 1, 1, pool=P),    # conv 8-9-10
    Conv(512, 3, 1, 1), Conv(512, 3, 1, 1), Conv(512, 3, 1, 1, pool=P),    # conv 11-12-13
]


@register_model(
    "deep_image", paper=PAPER, input_size=(3, 224, 224), pooling="floor", normalisation="none",
    reference_params=212_761_384,
    notes="3x3 convs, 2x2/2 pools, 224 input, dropout: not given by the paper, chosen as VGG",
)
def deep_image(num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5, fc_width: int = 6144,
               image_size: int = 224) -> ClassifierNet:
    if image_size < 32 or image_size % 32:
        raise ConfigError(f"deep_image image_size must be a multiple of 32 (224 or 512), got {image_size}")
    features = conv_stack(DEEP_IMAGE, in_chans)
    input_size = (in_chans, image_size, image_size)
    classifier = fc_head(flat_size(feature_shape(features, input_size)), [fc_width, fc_width], num_classes,
                         dropout, first=len(DEEP_IMAGE) + 1)
    return ClassifierNet(features, classifier, input_size)
