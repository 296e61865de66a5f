"""The model zoo: every model of the lecture, built by name.

    >>> from cnnkit.models import create, list_models
    >>> net = create("lenet5", num_classes=10)
"""

# importing a model file registers its models
from cnnkit.models import (  # noqa: F401
    alexnet,
    chatfield,
    deep_image,
    googlenet,
    lenet,
    nin,
    overfeat,
    small,
    vgg,
    zfnet,
)
from cnnkit.models.base import ClassifierNet, extract_features, fully_convolutional, linear_to_conv
from cnnkit.models.registry import ModelInfo, create, list_models, model_info, register_model

__all__ = [
    "ClassifierNet",
    "ModelInfo",
    "create",
    "extract_features",
    "fully_convolutional",
    "linear_to_conv",
    "list_models",
    "model_info",
    "register_model",
]
