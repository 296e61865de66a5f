"""How each kind of layer becomes dense: one small function per module type, function or method.

A rule gets the :class:`~cnnkit.dense.convert.Converter` (patch-net facts: ``cv.infos`` per node,
``cv.shape(node)``, ``cv.concrete(arg)``), the fx node and, for modules, the module itself; it
returns the dense :class:`Step` and the node's :class:`Info`. Adding a layer type is one function:

    @register_module(MyChannelwiseNorm)
    def _my_norm(cv, node, m):
        return pointwise(cv, node, m, "my norm")          # acts on each pixel's channels only

    @register_module(MyWindowedLayer)
    def _my_window(cv, node, m):                          # a k x k window with stride s
        return spatial(cv, node, lambda a, kw: MyKernel(m), kernel=m.k, stride=m.s, label="my op")

Anything without a rule is refused with the layer's name: it could mix pixels in a way that has no
exact dense form. Rules refuse, naming the layer, whatever they cannot make exact.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from cnnkit.dense.convert import (
    _SHAPE_BATCH,
    AUX,
    CatStep,
    Converter,
    IdentityStep,
    Info,
    OriginalStep,
    PointwiseStep,
    SizeStep,
    SpatialStep,
    layer_name,
)
from cnnkit.dense.ops import AvgPoolKernel, ConvKernel, MaxPoolKernel, prod
from cnnkit.layers.lrn import LocalResponseNorm as CnnkitLRN

Rule = Callable[[Converter, fx.Node, "nn.Module | None"], tuple]
MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Callable, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}


def register_module(*types: type):
    def deco(fn: Rule) -> Rule:
        for t in types:
            MODULE_RULES[t] = fn
        return fn
    return deco


def register_function(*fns: Callable):
    def deco(rule: Rule) -> Rule:
        for f in fns:
            FUNCTION_RULES[f] = rule
        return rule
    return deco


def register_method(*names: str):
    def deco(rule: Rule) -> Rule:
        for n in names:
            METHOD_RULES[n] = rule
        return rule
    return deco


def convert_node(cv: Converter, node: fx.Node) -> tuple:
    if node.op == "get_attr":
        return OriginalStep(node, cv.model), AUX
    if not cv.dense_inputs(node):  # does not depend on the image: run as the patch net does
        return OriginalStep(node, cv.model), AUX
    if node.op == "call_module":
        mod = cv.model.get_submodule(node.target)
        rule = MODULE_RULES.get(type(mod))
        if rule is None:
            cv.refuse(node, f"module type {type(mod).__name__} has no dense rule (it may mix pixels of "
                      "the patch); register one in cnnkit.dense.rules or rewrite the model")
        return rule(cv, node, mod)
    if node.op == "call_function":
        rule = FUNCTION_RULES.get(node.target)
    else:
        rule = METHOD_RULES.get(node.target)
    if rule is None:
        cv.refuse(node, "this function has no dense rule (it may mix pixels of the patch); "
                  "register one in cnnkit.dense.rules or rewrite the model")
    return rule(cv, node, None)


# --------------------------------------------------------------------------- helpers


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _tup(v, nd: int) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return (int(v[0]),) * nd
        return tuple(int(x) for x in v)
    return (int(v),) * nd


def _x(cv: Converter, node: fx.Node) -> Info:
    return cv.infos[node.args[0].name]


def _pool_out(s: int, k: int, st: int, p: int, dl: int, ceil: bool) -> int:
    """Output length with PyTorch's rule (a ceil-mode window must start inside the input)."""
    span = s + 2 * p - dl * (k - 1) - 1
    out = (-(-span // st) if ceil else span // st) + 1
    if ceil and (out - 1) * st >= s + p:
        out -= 1
    return out


def spatial(cv: Converter, node: fx.Node, make: Callable, *, kernel, stride=1, dilation=1, padding=0,
            ceil_mode=False, pad_value=0.0, label: str, macs: int = 0) -> tuple:
    """A window op (conv, pooling, FC on a map): stride 1, dilation times d, then d times stride."""
    x = _x(cv, node)
    nd = cv.nd
    if x.kind != "map":
        cv.refuse(node, "expects a spatial map but gets a flattened vector")
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:
            cv.refuse(node, f"padding={padding!r} zero-pads the map inside the patch")
    k, s, dl, p = (_tup(v, nd) for v in (kernel, stride, dilation, padding))
    expected = tuple(_pool_out(a, b, c, e, f, ceil_mode) for a, b, c, e, f in zip(x.spatial, k, s, p, dl))
    if ceil_mode:
        floor = tuple(_pool_out(a, b, c, e, f, False) for a, b, c, e, f in zip(x.spatial, k, s, p, dl))
        if floor != expected and cv.exact:
            cv.refuse(node, f"ceil_mode pooling of a {x.spatial} map has a partial window at the patch "
                      "edge that would read neighbouring pixels densely; use a patch size without "
                      "partial windows, ceil_mode=False, or exact=False")
    if any(p) and cv.exact:
        cv.refuse(node, f"zero padding inside the patch net (padding={p}): densely, a neighbour's pixels "
                  "sit where the patch saw zeros; remove the padding or pass exact=False (approximate)")
    out_shape = cv.shape(node)
    if out_shape is None or tuple(out_shape[2:]) != expected:
        cv.refuse(node, f"unexpected output shape {out_shape} (expected spatial size {expected})")
    dense_dil = tuple(a * b for a, b in zip(x.d, dl))
    ext = tuple(e + D * (kk - 1) - 2 * d * pp for e, D, kk, d, pp in zip(x.ext, dense_dil, k, x.d, p))
    info = Info("map", out_shape[1], expected, tuple(a * b for a, b in zip(x.d, s)), ext)
    step = SpatialStep(node.name, make, tuple(a * b for a, b in zip(x.d, dl)), k,
                       f"{label} {'x'.join(map(str, k))}",
                       pad=tuple(d * pp for d, pp in zip(x.d, p)) if any(p) else (), pad_value=pad_value)
    step.macs = macs * prod(k)
    return step, info


def _geometry(info: Info) -> tuple:
    """What must agree for two maps to combine position by position. A 1 x 1 map has one unit at
    the patch origin whatever its stride, so its stride does not matter."""
    return info.kind, info.spatial, info.d if any(s > 1 for s in info.spatial) else None


def pointwise(cv: Converter, node: fx.Node, fn: Callable, label: str,
              inplace: Callable | None = None) -> tuple:
    """An op acting on each position separately; several dense inputs must share geometry."""
    ins = cv.dense_inputs(node)
    first = ins[0]
    for other in ins[1:]:
        if _geometry(other) != _geometry(first):
            cv.refuse(node, f"combines maps of different geometry ({first.kind} {first.spatial} stride "
                      f"{first.d} vs {other.kind} {other.spatial} stride {other.d}); a per-patch "
                      "broadcast such as squeeze-and-excitation gating has no dense form")
    consts: list[tuple] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: consts.append(cv.shape(n))
                    if not cv.infos[n.name].is_dense and cv.shape(n) is not None else None)
    rank = 2 + cv.nd if first.kind == "map" else 2
    for shape in consts:
        if len(shape) == rank and shape[0] != 1:
            cv.refuse(node, f"combines the image with a per-image tensor of shape {shape}")
        trailing = shape[-cv.nd:] if first.kind == "map" else shape[-1:]
        if shape and not first.is_vector and any(v != 1 for v in trailing):
            cv.refuse(node, f"multiplies by a tensor of shape {shape} that varies across the patch")
    like = replace(first, ext=tuple(max(e) for e in zip(*(i.ext for i in ins))))
    info = cv.info_from_shape(node, like)
    return PointwiseStep(fn, label, cv.nd if first.is_vector else 0, inplace), info


def _call(node: fx.Node, mod: nn.Module | None) -> Callable:
    if mod is not None:
        return mod
    if node.op == "call_method":
        name = node.target
        return lambda x, *a, **k: getattr(x, name)(*a, **k)
    return node.target


def _norm_dim(cv: Converter, node: fx.Node, dim, x: Info) -> int:
    rank = 2 + cv.nd if x.kind == "map" else 2
    if dim is None:
        dim = 0 if rank in (0, 1, 3) else 1  # PyTorch's legacy implicit softmax dim
    dim = dim + rank if dim < 0 else dim
    if dim != 1 or (x.kind == "flat" and not x.is_vector):
        cv.refuse(node, f"acts along axis {dim} of a {rank}-D patch tensor; only the channel axis (1) "
                  "is position-wise")
    return 1


# --------------------------------------------------------------------------- convolutions, FC


@register_module(nn.Conv1d, nn.Conv2d)
def _conv_module(cv, node, m):
    if m.padding_mode != "zeros" and any(_tup(m.padding, cv.nd)) and cv.exact:
        cv.refuse(node, f"{m.padding_mode} padding inside the patch net")
    return spatial(cv, node, lambda a, kw: ConvKernel(m.weight, m.bias, m.kernel_size, m.groups),
                   kernel=m.kernel_size, stride=m.stride, dilation=m.dilation, padding=m.padding,
                   label=f"conv {m.in_channels}->{m.out_channels}",
                   macs=m.out_channels * m.in_channels // m.groups)


@register_function(F.conv1d, F.conv2d)
def _conv_function(cv, node, _):
    w_shape = cv.shape(node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
    nd = cv.nd
    dil = _tup(cv.concrete(_arg(node, 5, "dilation", 1)), nd)
    groups = cv.concrete(_arg(node, 6, "groups", 1))

    def make(a, kw):
        w = a[0] if a else kw["weight"]
        b = a[1] if len(a) > 1 else kw.get("bias")
        return ConvKernel(w, b, tuple(w_shape[2:]), groups)

    return spatial(cv, node, make, kernel=tuple(w_shape[2:]), stride=cv.concrete(_arg(node, 3, "stride", 1)),
                   dilation=dil, padding=cv.concrete(_arg(node, 4, "padding", 0)),
                   label=f"conv {w_shape[1] * groups}->{w_shape[0]}", macs=w_shape[0] * w_shape[1])


def linear(cv: Converter, node: fx.Node, weight: Callable, bias: Callable, out_features: int) -> tuple:
    """The lecture's FC -> conv: after a C x M x M map, N kernels of C x M x M dilated by d;
    after another FC, M x 1 x 1. The weight is a *view* of the Linear's, so gradients reach it."""
    x = _x(cv, node)
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
    return spatial(cv, node, lambda a, kw: MaxPoolKernel(_tup(kernel, cv.nd)),
                   kernel=kernel, stride=stride if stride else kernel, dilation=dilation, padding=padding,
                   ceil_mode=ceil_mode, pad_value=float("-inf"), label="max-pool")


def _avg_pool(cv, node, kernel, stride, padding, ceil_mode, count_include_pad, divisor):
    k = _tup(kernel, cv.nd)
    scale = 1.0 / (divisor if divisor else prod(k))
    return spatial(cv, node, lambda a, kw: AvgPoolKernel(k, scale), kernel=k,
                   stride=stride if stride else kernel, padding=padding, ceil_mode=ceil_mode,
                   label="avg-pool")


@register_module(nn.MaxPool1d, nn.MaxPool2d)
def _max_pool_module(cv, node, m):
    return _max_pool(cv, node, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


@register_module(nn.AvgPool1d, nn.AvgPool2d)
def _avg_pool_module(cv, node, m):
    return _avg_pool(cv, node, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                     getattr(m, "divisor_override", None))


@register_function(F.max_pool1d, F.max_pool2d)
def _max_pool_function(cv, node, _):
    c = cv.concrete
    return _max_pool(cv, node, c(_arg(node, 1, "kernel_size")), c(_arg(node, 2, "stride")),
                     c(_arg(node, 3, "padding", 0)), c(_arg(node, 4, "dilation", 1)),
                     c(_arg(node, 5, "ceil_mode", False)), c(_arg(node, 6, "return_indices", False)))


@register_function(F.avg_pool1d, F.avg_pool2d)
def _avg_pool_function(cv, node, _):
    c = cv.concrete
    return _avg_pool(cv, node, c(_arg(node, 1, "kernel_size")), c(_arg(node, 2, "stride")),
                     c(_arg(node, 3, "padding", 0)), c(_arg(node, 4, "ceil_mode", False)),
                     c(_arg(node, 5, "count_include_pad", True)), c(_arg(node, 6, "divisor_override")))


def _adaptive(cv, node, output_size, kind: str):
    """Adaptive pooling is exact only when every window has the same size (S divisible by the
    output): it is then ordinary pooling with kernel = stride = S / output; (1, 1) is global pooling."""
    x = _x(cv, node)
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


@register_module(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
def _adaptive_avg_module(cv, node, m):
    return _adaptive(cv, node, m.output_size, "avg")


@register_module(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
def _adaptive_max_module(cv, node, m):
    if m.return_indices:
        cv.refuse(node, "adaptive max pooling with return_indices")
    return _adaptive(cv, node, m.output_size, "max")


@register_function(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)
def _adaptive_avg_function(cv, node, _):
    return _adaptive(cv, node, cv.concrete(_arg(node, 1, "output_size")), "avg")


@register_function(F.adaptive_max_pool1d, F.adaptive_max_pool2d)
def _adaptive_max_function(cv, node, _):
    if cv.concrete(_arg(node, 2, "return_indices", False)):
        cv.refuse(node, "adaptive max pooling with return_indices")
    return _adaptive(cv, node, cv.concrete(_arg(node, 1, "output_size")), "max")


def _reduction(cv, node, kind: str):
    """``x.mean((2, 3))`` and friends over all spatial axes: global pooling, i.e. an M x M pool
    dilated by d (M is the map size inside the patch net)."""
    x = _x(cv, node)
    dim = cv.concrete(_arg(node, 1, "dim"))
    keepdim = cv.concrete(_arg(node, 2, "keepdim", False))
    rank = 2 + cv.nd if x.kind == "map" else 2
    dims = None if dim is None else {(d + rank if d < 0 else d) for d in _tup_list(dim)}
    if dims == {1} and keepdim and (x.kind == "map" or x.is_vector):  # over channels: per position
        return pointwise(cv, node, _call(node, None), f"{kind} over channels")
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
    if _x(cv, node).kind != "map":
        cv.refuse(node, "LRN on a flattened vector")
    return pointwise(cv, node, m, "LRN")


@register_function(F.local_response_norm)
def _lrn_function(cv, node, _):
    return _lrn_module(cv, node, F.local_response_norm)


@register_module(nn.Softmax, nn.LogSoftmax)
def _softmax_module(cv, node, m):
    _norm_dim(cv, node, m.dim, _x(cv, node))
    fn = F.softmax if isinstance(m, nn.Softmax) else F.log_softmax
    return pointwise(cv, node, lambda t: fn(t, 1), type(m).__name__)


@register_function(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)
@register_method("softmax", "log_softmax")
def _softmax_function(cv, node, _):
    _norm_dim(cv, node, cv.concrete(_arg(node, 1, "dim")), _x(cv, node))
    log = node.target in (F.log_softmax, torch.log_softmax, "log_softmax")
    fn = F.log_softmax if log else F.softmax
    return pointwise(cv, node, lambda t, *a, **k: fn(t, 1), fn.__name__)


@register_module(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm_module(cv, node, m):
    """Eval-mode BatchNorm is a per-channel affine map (running statistics), whatever the mode of
    the module: batch statistics over all pixels would not be per-patch."""
    x = _x(cv, node)
    if m.running_mean is None:
        cv.refuse(node, "BatchNorm without running statistics normalises by batch statistics")
    if x.kind == "flat" and not x.is_vector:
        cv.refuse(node, "BatchNorm on a flattened map scales every patch position differently")
    return pointwise(cv, node, lambda t: F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias,
                                                      False, 0.0, m.eps), "BatchNorm (eval)")


@register_function(F.batch_norm)
def _batchnorm_function(cv, node, _):
    if _arg(node, 1, "running_mean") is None:
        cv.refuse(node, "batch_norm without running statistics")

    def fn(t, mean, var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, **_kw):
        return F.batch_norm(t, mean, var, weight, bias, False, 0.0, eps)

    return pointwise(cv, node, fn, "batch_norm (eval)")


@register_module(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity)
def _identity_module(cv, node, m):
    return IdentityStep(type(m).__name__), _x(cv, node)


@register_function(F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout)
def _identity_function(cv, node, _):
    return IdentityStep("dropout (eval)"), _x(cv, node)


@register_method("contiguous", "clone", "detach")
def _identity_method(cv, node, _):
    return IdentityStep(node.target), _x(cv, node)


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
    return pointwise(cv, node, _call(node, None), name, inplace)


_INPLACE = {F.relu: torch.relu_, torch.relu: torch.relu_, "relu": torch.relu_, torch.tanh: torch.tanh_,
            "tanh": torch.tanh_, F.tanh: torch.tanh_, torch.sigmoid: torch.sigmoid_,
            "sigmoid": torch.sigmoid_, F.sigmoid: torch.sigmoid_}


@register_function(torch.cat, torch.concat, torch.concatenate)
def _cat(cv, node, _):
    parts = node.args[0]
    dim = cv.concrete(_arg(node, 1, "dim", 0))
    infos = [cv.infos[p.name] for p in parts]
    if not all(i.is_dense for i in infos):
        cv.refuse(node, "concatenates the image's maps with a tensor that does not depend on it")
    first = infos[0]
    if first.kind == "flat" and not first.is_vector:
        if dim not in (1, -1):  # flattened maps concatenated: still channel-major C*M*M blocks
            cv.refuse(node, f"concatenates flattened maps along axis {dim}")
    else:
        _norm_dim(cv, node, dim, first)
    for other in infos[1:]:
        if _geometry(other) != _geometry(first):
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
    x = _x(cv, node)
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
    dim = cv.concrete(_arg(node, 1, "dim"))
    return SizeStep(cv.values[node.name], dim is None or dim == 0), AUX


@register_function(getattr)
def _getattr(cv, node, _):
    if node.args[1] != "shape":
        cv.refuse(node, f"reads attribute {node.args[1]!r} of a map")
    return SizeStep(cv.values[node.name], True), AUX


@register_function(operator.getitem)
def _getitem(cv, node, _):
    cv.refuse(node, "indexes or slices a map of the patch net")


__all__ = ["MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES", "register_module", "register_function",
           "register_method", "spatial", "pointwise", "linear", "layer_name"]
