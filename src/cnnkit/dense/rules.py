"""How each kind of layer becomes dense: one small function per module type, function or method.

A rule gets the :class:`~cnnkit.dense.graph.Converter` (patch-net facts: ``cv.infos`` per node,
``cv.shape(node)``, ``cv.concrete(arg)``), the fx node and, for modules, the module itself; it
returns the dense :class:`Step` and the node's :class:`Info`. Adding a layer type is one function:

    @register_module(MyChannelwiseNorm)
    def _my_norm(cv, node, m):
        return pointwise(cv, node, m, "my norm")          # acts on each pixel's channels only

    @register_module(MyWindowedLayer)
    def _my_window(cv, node, m):                          # a k x k window with stride s
        return spatial(cv, node, lambda a, kw: MyKernel(m), kernel=m.k, stride=m.s, label="my op")

Anything without a rule is refused with the layer's name: it could mix pixels in a way that has no
exact dense form. Rules refuse, naming the layer, whatever they cannot make exact. This file holds
the registry and the helpers; the rules for PyTorch's and cnnkit's layers are in
``rules_window`` (convolutions, FC, pooling), ``rules_pointwise`` (activations, norms, cat,
reshapes), ``rules_slicing`` (crops, channel slices, split) and ``rules_cnnkit`` (cnnkit's own
layers); they import this file, and :mod:`cnnkit.dense.convert` imports them all, which fills the
tables before any conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch.fx as fx
from torch import nn

from cnnkit.dense.graph import AUX, Converter, Info, OriginalStep, PointwiseStep, SpatialStep
from cnnkit.dense.ops import prod

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


def arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def as_tuple(v, nd: int) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return (int(v[0]),) * nd
        return tuple(int(x) for x in v)
    return (int(v),) * nd


def input_info(cv: Converter, node: fx.Node) -> Info:
    return cv.infos[node.args[0].name]


def pool_out(s: int, k: int, st: int, p: int, dl: int, ceil: bool) -> int:
    """Output length with PyTorch's rule (a ceil-mode window must start inside the input)."""
    span = s + 2 * p - dl * (k - 1) - 1
    out = (-(-span // st) if ceil else span // st) + 1
    if ceil and (out - 1) * st >= s + p:
        out -= 1
    return out


def spatial(cv: Converter, node: fx.Node, make: Callable, *, kernel, stride=1, dilation=1, padding=0,
            ceil_mode=False, pad_value=0.0, label: str, macs: int = 0) -> tuple:
    """A window op (conv, pooling, FC on a map): stride 1, dilation times d, then d times stride."""
    x = input_info(cv, node)
    nd = cv.nd
    if x.kind != "map":
        cv.refuse(node, "expects a spatial map but gets a flattened vector")
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:
            cv.refuse(node, f"padding={padding!r} zero-pads the map inside the patch")
    k, s, dl, p = (as_tuple(v, nd) for v in (kernel, stride, dilation, padding))
    expected = tuple(pool_out(a, b, c, e, f, ceil_mode) for a, b, c, e, f in zip(x.spatial, k, s, p, dl))
    if ceil_mode:
        floor = tuple(pool_out(a, b, c, e, f, False) for a, b, c, e, f in zip(x.spatial, k, s, p, dl))
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


def geometry(info: Info) -> tuple:
    """What must agree for two maps to combine position by position. A 1 x 1 map has one unit at
    the patch origin whatever its stride, so its stride does not matter."""
    return info.kind, info.spatial, info.d if any(s > 1 for s in info.spatial) else None


def pointwise(cv: Converter, node: fx.Node, fn: Callable, label: str,
              inplace: Callable | None = None) -> tuple:
    """An op acting on each position separately; several dense inputs must share geometry."""
    ins = cv.dense_inputs(node)
    first = ins[0]
    for other in ins[1:]:
        if geometry(other) != geometry(first):
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


def call_target(node: fx.Node, mod: nn.Module | None) -> Callable:
    if mod is not None:
        return mod
    if node.op == "call_method":
        name = node.target
        return lambda x, *a, **k: getattr(x, name)(*a, **k)
    return node.target


def channel_dim(cv: Converter, node: fx.Node, dim, x: Info) -> int:
    rank = 2 + cv.nd if x.kind == "map" else 2
    if dim is None:
        dim = 0 if rank in (0, 1, 3) else 1  # PyTorch's legacy implicit softmax dim
    dim = dim + rank if dim < 0 else dim
    if dim != 1 or (x.kind == "flat" and not x.is_vector):
        cv.refuse(node, f"acts along axis {dim} of a {rank}-D patch tensor; only the channel axis (1) "
                  "is position-wise")
    return 1

