"""Dense rules for slicing a map: constant spatial crops and strided slices, channel slices,
``narrow``, and ``split``/``chunk`` along channels.

A crop is a shift. If the patch net keeps positions ``a, a+s, ..., a+s(S'-1)`` of a map with
``S`` positions and accumulated stride ``d``, then ``y[t] = x[a + s t]`` and, with the
correspondence of :mod:`cnnkit.dense.convert` (``D[u] = node(patch at u - d t)[t]``),
``Dy[u] = Dx[u + d a]``: the dense map loses ``d a`` positions at the start. It also loses
``d e`` at the end, ``e = S - 1 - (a + s(S'-1))`` the positions dropped there, so that it stays as
long as the patches it stands for (the extent grows by ``d (a + e)``, as a kernel's would). A step
``s`` is a stride-``s`` subsampling with kernel 1: nothing moves, later kernels see ``d s``.
Channels are the same axis in both nets, so channel slices carry over unchanged.
"""

from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx

from cnnkit.dense.graph import _SHAPE_BATCH, Info, Step, Value
from cnnkit.dense.rules import arg, input_info, register_function, register_method


class SliceStep(Step):
    """Slices the channel axis and crops each spatial axis by ``crops[i] = (start, end)``."""

    def __init__(self, channels: slice, crops: tuple[tuple[int, int], ...], label: str):
        self.channels, self.crops, self.label = channels, crops, label

    def __call__(self, x: Value, *args, **kwargs) -> Value:
        if not any(a or e for a, e in self.crops):
            return Value(x.t[:, self.channels], x.levels)  # the layout's batch blocks hold whole channels
        t = x.dense()
        spatial = tuple(slice(a, max(a, t.shape[2 + i] - e)) for i, (a, e) in enumerate(self.crops))
        return Value(t[(slice(None), self.channels, *spatial)])


class SplitStep(Step):
    label = "split channels"

    def __init__(self, bounds: list[tuple[int, int]]):
        self.bounds = bounds

    def __call__(self, x: Value, *args, **kwargs) -> tuple[Value, ...]:
        return tuple(Value(x.t[:, a:b], x.levels) for a, b in self.bounds)


class PickStep(Step):
    label = "part of a split"

    def __init__(self, i: int):
        self.i = i

    def __call__(self, parts, *args, **kwargs) -> Value:
        return parts[self.i]


def _full(sl) -> bool:
    return isinstance(sl, slice) and sl.start in (None, 0) and sl.stop is None and sl.step in (None, 1)


def _per_axis(cv, node: fx.Node, index, rank: int) -> list:
    """The index as one ``slice`` per axis of the patch tensor; refuses anything else."""
    index = index if isinstance(index, tuple) else (index,)
    for i in index:
        if not (isinstance(i, (slice, int)) or i is Ellipsis) or isinstance(i, bool):
            what = "a tensor" if isinstance(i, torch.Tensor) else repr(i)
            cv.refuse(node, f"indexes a map with {what}; only constant slices have a dense form")
    if sum(i is Ellipsis for i in index) > 1:
        cv.refuse(node, "indexes with more than one Ellipsis")
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (rank - len(index) + 1) + index[k + 1:]
    if len(index) > rank:
        cv.refuse(node, f"indexes {len(index)} axes of a {rank}-D patch tensor")
    return list(index) + [slice(None)] * (rank - len(index))


def slice_rule(cv, node: fx.Node, x: Info, per_axis: list, label: str) -> tuple:
    """A slice of every axis (one ``slice`` or int each): the Step and the Info of the result."""
    if not _full(per_axis[0]):
        cv.refuse(node, "slices the batch axis; only channel and spatial slices have a dense form")
    if any(isinstance(sl, int) for sl in per_axis):
        cv.refuse(node, "indexes an axis with an integer, which drops it; slice it instead (x[:, i:i+1])")
    if x.kind == "flat" and not x.is_vector:
        if not _full(per_axis[1]):
            cv.refuse(node, "slices a flattened map (its features mix channels and positions of the patch)")
        return SliceStep(slice(None), ((0, 0),) * cv.nd, label), x
    kept = range(x.channels)[per_axis[1]]
    if len(kept) == 0:
        cv.refuse(node, "slice keeps no channels")
    channels = slice(kept.start, kept.start + len(kept) * kept.step, kept.step)
    crops, spatial, d, ext = [], [], [], []
    for i, sl in enumerate(per_axis[2:]):
        r = range(x.spatial[i])[sl]
        if len(r) == 0:
            cv.refuse(node, f"slice keeps no positions along spatial axis {i}")
        a, e = r[0], x.spatial[i] - 1 - r[-1]
        step = r.step if len(r) > 1 else 1  # one position: no later kernel steps along this axis
        crops.append((x.d[i] * a, x.d[i] * e))
        spatial.append(len(r))
        d.append(x.d[i] * step)
        ext.append(x.ext[i] + x.d[i] * (a + e))
    if x.kind == "map":
        info = replace(x, channels=len(kept), spatial=tuple(spatial), d=tuple(d), ext=tuple(ext))
        expected = (_SHAPE_BATCH, len(kept), *spatial)
    else:
        info = replace(x, channels=len(kept))
        expected = (_SHAPE_BATCH, len(kept))
    if cv.shape(node) != expected:
        cv.refuse(node, f"unexpected output shape {cv.shape(node)} (expected {expected})")
    return SliceStep(channels, tuple(crops), label), info


@register_function(operator.getitem)
def _getitem(cv, node, _):
    src = node.args[0]
    if not isinstance(src, fx.Node) or cv.infos[src.name].kind not in ("map", "flat", "parts"):
        cv.refuse(node, "indexes with a tensor computed from the image (data-dependent indexing)")
    x = cv.infos[src.name]
    index = cv.concrete(node.args[1])
    if x.kind == "parts":
        if not isinstance(index, int):
            cv.refuse(node, f"indexes the parts of a split with {index!r}")
        return PickStep(index), x.parts[index]
    rank = 2 + cv.nd if x.kind == "map" else 2
    return slice_rule(cv, node, x, _per_axis(cv, node, index, rank), "slice")


@register_function(torch.narrow)
@register_method("narrow")
def _narrow(cv, node, _):
    x = input_info(cv, node)
    dim, start, length = (cv.concrete(arg(node, i, n)) for i, n in ((1, "dim"), (2, "start"), (3, "length")))
    rank = 2 + cv.nd if x.kind == "map" else 2
    dim = dim + rank if dim < 0 else dim
    size = cv.shape(node.args[0])[dim]
    start = start + size if start < 0 else start
    per_axis = [slice(None)] * rank
    per_axis[dim] = slice(start, start + length)
    return slice_rule(cv, node, x, per_axis, "narrow")


@register_function(torch.split, torch.chunk)
@register_method("split", "chunk")
def _split(cv, node, _):
    """Split or chunk along channels: each part is a channel slice of the same geometry."""
    x = input_info(cv, node)
    dim = cv.concrete(arg(node, 2, "dim", 0))
    rank = 2 + cv.nd if x.kind == "map" else 2
    if (dim + rank if dim < 0 else dim) != 1 or (x.kind == "flat" and not x.is_vector):
        cv.refuse(node, f"splits along axis {dim} of a {rank}-D patch tensor; only the channel axis (1) "
                  "has a dense form")
    sizes = [v.shape[1] for v in cv.values[node.name]]  # read off the patch net's run
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    parts = tuple(replace(x, channels=n) for n in sizes)
    return SplitStep(bounds), Info("parts", parts=parts)
