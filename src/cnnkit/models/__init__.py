"""The model zoo: every model of the lecture, built by name.

    >>> from cnnkit.models import create, create_patch_net, list_models
    >>> net = create("lenet5", num_classes=10)
    >>> net, patch = create_patch_net("ciresan_n4")  # a patch classifier and its (P, P)
"""

# importing a model file registers its models
from cnnkit.models import (  # noqa: F401
    alexnet,
    chatfield,
    deep_image,
    googlenet,
    lenet,
    lenet1998,
    nin,
    overfeat,
    patch,
    small,
    vgg,
    zfnet,
)
from cnnkit.models.base import ClassifierNet, extract_features, fully_convolutional, linear_to_conv
from cnnkit.models.patch import PATCH_NETS, create_patch_net
from cnnkit.models.registry import ModelInfo, create, list_models, model_info, register_model

__all__ = [
    "ClassifierNet",
    "ModelInfo",
    "PATCH_NETS",
    "create",
    "create_patch_net",
    "extract_features",
    "fully_convolutional",
    "linear_to_conv",
    "list_models",
    "model_info",
    "register_model",
]
