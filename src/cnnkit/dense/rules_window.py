"""Dense rules for window layers: convolutions, FC layers (the lecture's FC -> conv), max and
average pooling, adaptive pooling with equal windows, and global pooling by reduction."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from cnnkit.dense.graph import Converter, Info, SpatialStep
from cnnkit.dense.ops import AvgPoolKernel, ConvKernel, MaxPoolKernel, prod
from cnnkit.dense.rules import (
    FUNCTION_RULES,
    METHOD_RULES,
    arg,
    as_tuple,
    call_target,
    input_info,
    pointwise,
    register_function,
    register_module,
    spatial,
)

# --------------------------------------------------------------------------- convolutions, FC


def check_rank(cv: Converter, node: fx.Node, m: nn.Module) -> None:
    """A ``...3d`` module in a 2D patch net would take the (N, C, H, W) patch for one unbatched
    volume and mix the batch and channel axes: refuse a module whose rank is not the patch's."""
    name = type(m).__name__
    if name[-1] == "d" and name[-2].isdigit() and int(name[-2]) != cv.nd:
        cv.refuse(node, f"{name} in a {cv.nd}D patch net (patch {cv.patch}); give patch_size with "
                  f"{name[-2]} axes")


@register_module(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_module(cv, node, m):
    check_rank(cv, node, m)
    if m.padding_mode != "zeros" and any(as_tuple(m.padding, cv.nd)) and cv.exact:
        cv.refuse(node, f"{m.padding_mode} padding inside the patch net")
    return spatial(cv, node, lambda a, kw: ConvKernel(m.weight, m.bias, m.kernel_size, m.groups),
                   kernel=m.kernel_size, stride=m.stride, dilation=m.dilation, padding=m.padding,
                   label=f"conv {m.in_channels}->{m.out_channels}",
                   macs=m.out_channels * m.in_channels // m.groups)


@register_function(F.conv1d, F.conv2d, F.conv3d)
def _conv_function(cv, node, _):
    w_shape = cv.shape(node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
    nd = cv.nd
    dil = as_tuple(cv.concrete(arg(node, 5, "dilation", 1)), nd)
    groups = cv.concrete(arg(node, 6, "groups", 1))

    def make(a, kw):
        w = a[0] if a else kw["weight"]
        b = a[1] if len(a) > 1 else kw.get("bias")
        return ConvKernel(w, b, tuple(w_shape[2:]), groups)

    return spatial(cv, node, make, kernel=tuple(w_shape[2:]), stride=cv.concrete(arg(node, 3, "stride", 1)),
                   dilation=dil, padding=cv.concrete(arg(node, 4, "padding", 0)),
                   label=f"conv {w_shape[1] * groups}->{w_shape[0]}", macs=w_shape[0] * w_shape[1])


def linear(cv: Converter, node: fx.Node, weight: Callable, bias: Callable, out_features: int) -> tuple:
    """The lecture's FC -> conv: after a C x M x M map, N kernels of C x M x M dilated by d;
    after another FC, M x 1 x 1. The weight is a *view* of the Linear's, so gradients reach it."""
    x = input_info(cv, node)
    if x.kind != "flat":
        cv.refuse(node, "Linear applied to a spatial map acts along its last axis; flatten first")
    c, s = x.channels, x.spatial

    def make(a, kw):
        return ConvKernel(weight(a, kw).view(out_features, c, *s), bias(a, kw), s, 1)

    dil = x.d if any(v > 1 for v in s) else (1,) * cv.nd
    ext = tuple(e + d * (v - 1) for e, d, v in zip(x.ext, x.d, s))
    step = SpatialStep(node.name, make, dil, s, f"fc->conv {c}x{'x'.join(map(str, s))}->{out_features}")
    step.macs = out_features * c * prod(s)
    return step, Info("flat", out_features, (1,) * cv.nd, x.d, ext)


@register_module(nn.Linear)
def _linear_module(cv, node, m):
    return linear(cv, node, lambda a, kw: m.weight, lambda a, kw: m.bias, m.out_features)


@register_function(F.linear)
def _linear_function(cv, node, _):
    w_shape = cv.shape(node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
    return linear(cv, node, lambda a, kw: a[0] if a else kw["weight"],
                  lambda a, kw: a[1] if len(a) > 1 else kw.get("bias"), w_shape[0])


# --------------------------------------------------------------------------- pooling


def _max_pool(cv, node, kernel, stride, padding, dilation, ceil_mode, return_indices):
    if return_indices:
        cv.refuse(node, "max pooling with return_indices")
    return spatial(cv, node, lambda a, kw: MaxPoolKernel(as_tuple(kernel, cv.nd)),
                   kernel=kernel, stride=stride if stride else kernel, dilation=dilation, padding=padding,
                   ceil_mode=ceil_mode, pad_value=float("-inf"), label="max-pool")


def _avg_pool(cv, node, kernel, stride, padding, ceil_mode, count_include_pad, divisor):
    k = as_tuple(kernel, cv.nd)
    scale = 1.0 / (divisor if divisor else prod(k))
    return spatial(cv, node, lambda a, kw: AvgPoolKernel(k, scale), kernel=k,
                   stride=stride if stride else kernel, padding=padding, ceil_mode=ceil_mode,
                   label="avg-pool")


@register_module(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def _max_pool_module(cv, node, m):
    check_rank(cv, node, m)
    return _max_pool(cv, node, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


@register_module(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def _avg_pool_module(cv, node, m):
    check_rank(cv, node, m)
    return _avg_pool(cv, node, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                     getattr(m, "divisor_override", None))


@register_function(F.max_pool1d, F.max_pool2d, F.max_pool3d)
def _max_pool_function(cv, node, _):
    c = cv.concrete
    return _max_pool(cv, node, c(arg(node, 1, "kernel_size")), c(arg(node, 2, "stride")),
                     c(arg(node, 3, "padding", 0)), c(arg(node, 4, "dilation", 1)),
                     c(arg(node, 5, "ceil_mode", False)), c(arg(node, 6, "return_indices", False)))


@register_function(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
def _avg_pool_function(cv, node, _):
    c = cv.concrete
    return _avg_pool(cv, node, c(arg(node, 1, "kernel_size")), c(arg(node, 2, "stride")),
                     c(arg(node, 3, "padding", 0)), c(arg(node, 4, "ceil_mode", False)),
                     c(arg(node, 5, "count_include_pad", True)), c(arg(node, 6, "divisor_override")))


def _adaptive(cv, node, output_size, kind: str):
    """Adaptive pooling is exact only when every window has the same size (S divisible by the
    output): it is then ordinary pooling with kernel = stride = S / output; (1, 1) is global pooling."""
    x = input_info(cv, node)
    out = [s if o is None else o for s, o in zip(x.spatial, _tup_none(output_size, cv.nd))]
    if any(s % o for s, o in zip(x.spatial, out)):
        cv.refuse(node, f"adaptive pooling from {x.spatial} to {tuple(out)} uses windows of unequal size, "
                  "which have no dense form; use a fixed kernel and stride")
    k = tuple(s // o for s, o in zip(x.spatial, out))
    if kind == "max":
        return _max_pool(cv, node, k, k, 0, 1, False, False)
    return _avg_pool(cv, node, k, k, 0, False, True, None)


def _tup_none(v, nd):
    if isinstance(v, (tuple, list)):
        return tuple(v) if len(v) == nd else tuple(v) * nd
    return (v,) * nd


@register_module(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def _adaptive_avg_module(cv, node, m):
    check_rank(cv, node, m)
    return _adaptive(cv, node, m.output_size, "avg")


@register_module(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
def _adaptive_max_module(cv, node, m):
    check_rank(cv, node, m)
    if m.return_indices:
        cv.refuse(node, "adaptive max pooling with return_indices")
    return _adaptive(cv, node, m.output_size, "max")


@register_function(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
def _adaptive_avg_function(cv, node, _):
    return _adaptive(cv, node, cv.concrete(arg(node, 1, "output_size")), "avg")


@register_function(F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)
def _adaptive_max_function(cv, node, _):
    if cv.concrete(arg(node, 2, "return_indices", False)):
        cv.refuse(node, "adaptive max pooling with return_indices")
    return _adaptive(cv, node, cv.concrete(arg(node, 1, "output_size")), "max")


def _reduction(cv, node, kind: str):
    """``x.mean((2, 3))`` and friends over all spatial axes: global pooling, i.e. an M x M pool
    dilated by d (M is the map size inside the patch net)."""
    x = input_info(cv, node)
    dim = cv.concrete(arg(node, 1, "dim"))
    keepdim = cv.concrete(arg(node, 2, "keepdim", False))
    rank = 2 + cv.nd if x.kind == "map" else 2
    dims = None if dim is None else {(d + rank if d < 0 else d) for d in _tup_list(dim)}
    if dims == {1} and keepdim and (x.kind == "map" or x.is_vector):  # over channels: per position
        return pointwise(cv, node, call_target(node, None), f"{kind} over channels")
    if x.kind != "map" or dims != set(range(2, rank)):
        axes = "all axes" if dim is None else f"axes {dim}"
        cv.refuse(node, f"reduces over {axes} of the patch tensor; only reducing all spatial axes "
                  "(global pooling) or the channels (keepdim=True) has a dense form")
    k = x.spatial
    make = {
        "mean": lambda a, kw: AvgPoolKernel(k, 1.0 / prod(k)),
        "sum": lambda a, kw: AvgPoolKernel(k, 1.0),
        "amax": lambda a, kw: MaxPoolKernel(k),
    }[kind]
    ext = tuple(e + d * (s - 1) for e, d, s in zip(x.ext, x.d, k))
    step = SpatialStep(node.name, make, x.d, k, f"global {kind} {'x'.join(map(str, k))}")
    kind_out = "map" if keepdim else "flat"
    return step, Info(kind_out, x.channels, (1,) * cv.nd, x.d, ext)


def _tup_list(v):
    return list(v) if isinstance(v, (tuple, list)) else [v]


for _kind, _fn in (("mean", torch.mean), ("sum", torch.sum), ("amax", torch.amax)):
    FUNCTION_RULES[_fn] = (lambda kind: lambda cv, node, _: _reduction(cv, node, kind))(_kind)
    METHOD_RULES[_kind] = FUNCTION_RULES[_fn]
