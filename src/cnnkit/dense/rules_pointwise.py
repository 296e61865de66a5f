"""Dense rules for position-wise layers (activations, BatchNorm in eval mode, LRN, softmax over
channels, dropout, residual arithmetic), channel concatenation, and reshapes (flatten before FC)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.dense.graph import _SHAPE_BATCH, AUX, CatStep, IdentityStep, SizeStep
from cnnkit.dense.ops import prod
from cnnkit.dense.rules import (
    arg,
    call_target,
    channel_dim,
    geometry,
    input_info,
    pointwise,
    register_function,
    register_method,
    register_module,
)
from cnnkit.layers.lrn import LocalResponseNorm as CnnkitLRN

# --------------------------------------------------------------------------- position-wise


_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Softsign, nn.Tanh, nn.Tanhshrink, nn.Sigmoid, nn.LogSigmoid, nn.Hardtanh,
    nn.Hardsigmoid, nn.Hardswish, nn.Threshold,
)


def _inplace_module(m: nn.Module) -> Callable | None:
    if isinstance(m, nn.ReLU):
        return torch.relu_
    if isinstance(m, nn.Tanh):
        return torch.tanh_
    if isinstance(m, nn.Sigmoid):
        return torch.sigmoid_
    if isinstance(m, nn.LeakyReLU):
        return lambda t: F.leaky_relu_(t, m.negative_slope)
    if isinstance(m, nn.ELU):
        return lambda t: F.elu_(t, m.alpha)
    return None


@register_module(*_POINTWISE_MODULES)
def _activation_module(cv, node, m):
    return pointwise(cv, node, m, type(m).__name__, _inplace_module(m))


@register_module(nn.LocalResponseNorm, CnnkitLRN)
def _lrn_module(cv, node, m):
    """LRN mixes channels of one pixel only: unchanged in the dense net."""
    if input_info(cv, node).kind != "map":
        cv.refuse(node, "LRN on a flattened vector")
    return pointwise(cv, node, m, "LRN")


@register_function(F.local_response_norm)
def _lrn_function(cv, node, _):
    return _lrn_module(cv, node, F.local_response_norm)


@register_module(nn.Softmax, nn.LogSoftmax)
def _softmax_module(cv, node, m):
    channel_dim(cv, node, m.dim, input_info(cv, node))
    fn = F.softmax if isinstance(m, nn.Softmax) else F.log_softmax
    return pointwise(cv, node, lambda t: fn(t, 1), type(m).__name__)


@register_function(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)
@register_method("softmax", "log_softmax")
def _softmax_function(cv, node, _):
    channel_dim(cv, node, cv.concrete(arg(node, 1, "dim")), input_info(cv, node))
    log = node.target in (F.log_softmax, torch.log_softmax, "log_softmax")
    fn = F.log_softmax if log else F.softmax
    return pointwise(cv, node, lambda t, *a, **k: fn(t, 1), fn.__name__)


@register_module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batchnorm_module(cv, node, m):
    """Eval-mode BatchNorm is a per-channel affine map (running statistics), whatever the mode of
    the module: batch statistics over all pixels would not be per-patch."""
    x = input_info(cv, node)
    if m.running_mean is None:
        cv.refuse(node, "BatchNorm without running statistics normalises by batch statistics")
    if x.kind == "flat" and not x.is_vector:
        cv.refuse(node, "BatchNorm on a flattened map scales every patch position differently")
    return pointwise(cv, node, lambda t: F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias,
                                                      False, 0.0, m.eps), "BatchNorm (eval)")


@register_function(F.batch_norm)
def _batchnorm_function(cv, node, _):
    if arg(node, 1, "running_mean") is None:
        cv.refuse(node, "batch_norm without running statistics")

    def fn(t, mean, var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, **_kw):
        return F.batch_norm(t, mean, var, weight, bias, False, 0.0, eps)

    return pointwise(cv, node, fn, "batch_norm (eval)")


@register_module(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                 nn.Identity)
def _identity_module(cv, node, m):
    return IdentityStep(type(m).__name__), input_info(cv, node)


@register_function(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
def _identity_function(cv, node, _):
    return IdentityStep("dropout (eval)"), input_info(cv, node)


@register_method("contiguous", "clone", "detach")
def _identity_method(cv, node, _):
    return IdentityStep(node.target), input_info(cv, node)


_POINTWISE_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu, torch.tanh, torch.sigmoid,
    torch.exp, torch.log, torch.abs, torch.sqrt, torch.clamp, torch.square, torch.pow, torch.maximum,
    torch.minimum, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.softplus, F.softsign, F.hardtanh, F.hardswish, F.hardsigmoid, F.logsigmoid, F.tanhshrink,
    F.prelu, F.threshold, torch.nn.functional.tanh, torch.nn.functional.sigmoid,
)


@register_function(*_POINTWISE_FUNCTIONS)
@register_method("add", "sub", "mul", "div", "neg", "pow", "relu", "tanh", "sigmoid", "exp", "log",
                 "abs", "sqrt", "clamp", "square", "float", "double", "half", "bfloat16")
def _pointwise_call(cv, node, _):
    name = getattr(node.target, "__name__", str(node.target))
    one_arg = len(node.args) == 1 and not {k for k in node.kwargs if k != "inplace"}
    inplace = _INPLACE.get(node.target if node.op == "call_function" else name) if one_arg else None
    return pointwise(cv, node, call_target(node, None), name, inplace)


_INPLACE = {F.relu: torch.relu_, torch.relu: torch.relu_, "relu": torch.relu_, torch.tanh: torch.tanh_,
            "tanh": torch.tanh_, F.tanh: torch.tanh_, torch.sigmoid: torch.sigmoid_,
            "sigmoid": torch.sigmoid_, F.sigmoid: torch.sigmoid_}


@register_function(torch.cat, torch.concat, torch.concatenate)
def _cat(cv, node, _):
    parts = node.args[0]
    dim = cv.concrete(arg(node, 1, "dim", 0))
    infos = [cv.infos[p.name] for p in parts]
    if not all(i.is_dense for i in infos):
        cv.refuse(node, "concatenates the image's maps with a tensor that does not depend on it")
    first = infos[0]
    if first.kind == "flat" and not first.is_vector:
        if dim not in (1, -1):  # flattened maps concatenated: still channel-major C*M*M blocks
            cv.refuse(node, f"concatenates flattened maps along axis {dim}")
    else:
        channel_dim(cv, node, dim, first)
    for other in infos[1:]:
        if geometry(other) != geometry(first):
            cv.refuse(node, f"concatenates maps of different geometry ({first.spatial} stride {first.d} vs "
                      f"{other.spatial} stride {other.d})")
    ext = tuple(max(e) for e in zip(*(i.ext for i in infos)))
    info = replace(first, channels=sum(i.channels for i in infos), ext=ext)
    return CatStep(), info


# --------------------------------------------------------------------------- shapes


@register_module(nn.Flatten, nn.Unflatten)
@register_function(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
@register_method("view", "reshape", "flatten", "squeeze", "unsqueeze")
def _reshape(cv, node, _m=None):
    """Flatten before an FC layer (and its inverse): the dense map stays a map, Info remembers that
    the patch net sees ``(N, C*M*M)`` so the next Linear becomes a C x M x M convolution."""
    x = input_info(cv, node)
    shape = cv.shape(node)
    c, s = x.channels, x.spatial
    flat = (_SHAPE_BATCH, c * prod(s))
    as_map = (_SHAPE_BATCH, c, *s)
    if shape == flat:
        return IdentityStep("flatten"), replace(x, kind="flat")
    if shape == as_map:
        return IdentityStep("unflatten"), replace(x, kind="map")
    cv.refuse(node, f"reshapes a patch tensor of shape {as_map if x.kind == 'map' else flat} to {shape}; "
              "only flattening (N, C, *S) -> (N, C*S) and back has a dense form")


@register_method("size", "dim")
def _size(cv, node, _):
    if node.target == "dim":
        return SizeStep(cv.values[node.name], False), AUX
    dim = cv.concrete(arg(node, 1, "dim"))
    return SizeStep(cv.values[node.name], dim is None or dim == 0), AUX


@register_function(getattr)
def _getattr(cv, node, _):
    if node.args[1] != "shape":
        cv.refuse(node, f"reads attribute {node.args[1]!r} of a map")
    return SizeStep(cv.values[node.name], True), AUX

