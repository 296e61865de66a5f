"""The interface every zoo model offers, and conversions that work on any plain module.

A zoo classifier is ``features`` (convolutions and pooling) followed by ``classifier`` (Flatten and
fully connected layers), both ``nn.Sequential`` with the paper's layer names (``conv1``, ``fc7``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from cnnkit.errors import ConfigError


class ClassifierNet(nn.Module):
    """``features`` -> ``classifier``; the head is the classifier's last weighted layer."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, input_size: tuple[int, int, int]):
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.input_size = tuple(input_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def num_classes(self) -> int:
        return _out_units(_last_weighted(self.classifier))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last layer by a freshly initialised one with ``num_classes`` outputs."""
        replace_last_layer(self.classifier, num_classes)

    def to_fully_convolutional(self) -> nn.Module:
        """A copy whose FC layers are convolutions (the lecture's FC->conv), see ``fully_convolutional``."""
        return fully_convolutional(self, self.input_size)


def _last_weighted(seq: nn.Module) -> nn.Module:
    last = None
    for m in seq.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            last = m
    if last is None:
        raise ConfigError("model has no weighted layer in its classifier")
    return last


def _out_units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def replace_last_layer(seq: nn.Module, num_classes: int) -> None:
    """Swap the last Linear/Conv of ``seq`` for a new one with ``num_classes`` outputs."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    target = _last_weighted(seq)
    for parent in seq.modules():
        for name, child in parent.named_children():
            if child is target:
                if isinstance(child, nn.Linear):
                    new = nn.Linear(child.in_features, num_classes, bias=child.bias is not None)
                else:
                    new = type(child)(child.in_channels, num_classes, child.kernel_size, child.stride,
                                      child.padding, child.dilation, child.groups, child.bias is not None)
                new.to(device=child.weight.device, dtype=child.weight.dtype)
                setattr(parent, name, new)
                return


def linear_to_conv(linear: nn.Linear, in_shape: tuple[int, ...], dilation: int = 1) -> nn.Conv2d:
    """The lecture's conversion: an FC layer reading a C x M x M map becomes N kernels of C x M x M.

    ``in_shape`` is the (C, H, W) shape the FC layer's input had before flattening; after another
    FC layer it is (M, 1, 1) and the kernels are M x 1 x 1.
    """
    c, h, w = in_shape
    if c * h * w != linear.in_features:
        raise ConfigError(
            f"Linear({linear.in_features}, {linear.out_features}) cannot read a {c}x{h}x{w} map "
            f"({c * h * w} values)"
        )
    # built on meta and given storage afterwards: its random init would be overwritten anyway
    conv = nn.Conv2d(c, linear.out_features, (h, w), dilation=dilation, bias=linear.bias is not None,
                     device="meta", dtype=linear.weight.dtype)
    conv.to_empty(device=linear.weight.device)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.reshape(linear.out_features, c, h, w))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


def fully_convolutional(model: ClassifierNet, input_size: tuple[int, int, int]) -> nn.Module:
    """Copy of ``model`` with Flatten dropped and every Linear turned into a convolution.

    At the native input size the output is N x K x 1 x 1 and equals the original scores; on a larger
    image it is a map of class scores (with the network's total stride).
    """
    model = copy.deepcopy(model)
    shape = _feature_shape(model, input_size)  # (C, M, M) read by the first FC layer
    layers: list[tuple[str, nn.Module]] = []
    for name, m in model.classifier.named_children():
        if isinstance(m, nn.Flatten):
            continue
        if isinstance(m, nn.Linear):
            layers.append((name, linear_to_conv(m, shape if len(shape) == 3 else (shape[0], 1, 1))))
            shape = (m.out_features, 1, 1)
        else:
            layers.append((name, m))
            # a head may pool before its FC layer (GoogLeNet's avg pool 7x7/1): follow the shape
            shape = _module_out_shape(m, shape)
    model.classifier = _named_sequential(layers)
    return model


def _named_sequential(layers: Iterable[tuple[str, nn.Module]]) -> nn.Sequential:
    seq = nn.Sequential()
    for name, m in layers:
        seq.add_module(name, m)
    return seq


def _feature_shape(model: ClassifierNet, input_size: tuple[int, int, int]) -> tuple[int, ...]:
    return _module_out_shape(model.features, input_size, _dtype_of(model))


def _dtype_of(model: nn.Module) -> torch.dtype:
    param = next(model.parameters(), None)
    return param.dtype if param is not None else torch.get_default_dtype()


def _module_out_shape(module: nn.Module, in_shape: tuple[int, ...], dtype: torch.dtype | None = None
                      ) -> tuple[int, ...]:
    """Output shape (without batch) of ``module`` for one input of ``in_shape``, computed on meta."""
    dtype = dtype or _dtype_of(module)
    meta = copy.deepcopy(module).to("meta")
    with torch.no_grad():
        out = meta(torch.zeros(1, *in_shape, device="meta", dtype=dtype))
    return tuple(out.shape[1:])


def extract_features(model: nn.Module, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Outputs of the named submodules (as in ``named_modules``) for input ``x``, e.g. ``["fc7"]``.

    Works for any module through forward hooks; the model runs once.
    """
    modules = dict(model.named_modules())
    # accept short names ("fc7") for nested modules ("classifier.fc7")
    short = {n.rsplit(".", 1)[-1]: n for n in modules if n}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        full = name if name in modules else short.get(name)
        if full is None:
            raise ConfigError(f"model has no layer named {name!r}; layers: {', '.join(short)}")
        # a copy: the zoo's ReLUs work in place and would otherwise turn a kept fc7 into relu7's output
        handles.append(modules[full].register_forward_hook(
            lambda _m, _i, out, key=name: outputs.__setitem__(key, out.clone())))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return outputs
