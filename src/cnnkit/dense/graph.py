"""The traced patch net and the dense nodes built from it: what the converter and its rules share.

``Info`` is what the patch net holds at a node (read off one run on a patch-sized input); a
``Step`` is what the dense net does there; the ``Converter`` holds the traced graph and those facts.
The correspondence they rely on is stated in :mod:`cnnkit.dense.convert`; the per-type rules that
turn a node into a Step are in :mod:`cnnkit.dense.rules`. Both import this file, never each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
from torch import nn

from cnnkit.dense.ops import (
    Factors,
    LayoutChooser,
    SpatialKernel,
    Value,
    crop_to_common,
    exact_pointwise,
    pixel_chunked,
    preferred_format,
    prod,
)
from cnnkit.errors import ConfigError, UnsupportedLayerError


@dataclass(frozen=True)
class Info:
    """What the patch net holds at a node.

    kind: ``map`` (N, C, *S); ``flat`` (N, C*prod(S)) made by flattening such a map (a plain
    feature vector is ``flat`` with S all ones); ``parts`` the tuple that ``split``/``chunk`` of
    such a tensor returns (``parts`` holds each part's Info); ``aux`` anything else (ints from
    ``x.size(0)``, parameters, tensors that do not depend on the input).
    d: accumulated stride (Algorithm 1's d) per axis; ext: how many input positions the dense map
    is shorter than its input (sum of dilated kernel extents along the longest path).
    """

    kind: str
    channels: int = 0
    spatial: Factors = ()
    d: Factors = ()
    ext: Factors = ()
    parts: tuple[Info, ...] = ()

    @property
    def is_dense(self) -> bool:
        return self.kind in ("map", "flat")

    @property
    def is_vector(self) -> bool:
        return self.kind == "flat" and all(s == 1 for s in self.spatial)


AUX = Info("aux")


class Step:
    """A dense node. Called with the node's arguments resolved (``Value`` for dense inputs)."""

    label = ""

    def __call__(self, *args, **kwargs):
        raise NotImplementedError


class SpatialStep(Step):
    """A sliding-window op with dense dilation ``dilation``; layout chosen by the chooser.

    ``make(args, kwargs)`` builds the kernel from the node's runtime arguments (functional convs
    get their weight there; modules read their own parameters, so they are shared and trained).
    """

    def __init__(self, name: str, make: Callable[..., SpatialKernel], dilation: Factors, kernel: Factors,
                 label: str, pad: Factors = (), pad_value: float = 0.0):
        self.name, self.make, self.dilation, self.kernel_size = name, make, dilation, tuple(kernel)
        self.label, self.pad, self.pad_value = label, pad, pad_value
        self.chooser: LayoutChooser | None = None
        self.chosen: str | None = None
        self.macs = 0  # multiply-accumulates per output position (convolutions and FC layers)
        self.out_ext: Factors = ()  # set by convert(): the output map's extent deficit
        self.patch_positions = 1  # output positions of this layer in the patch net

    def __call__(self, x: Value, *args, **kwargs) -> Value:
        kernel = self.make(args, kwargs)
        if self.pad:  # exact=False only: the padding lands at the map's border, not the patch's
            spec = [p for q in reversed(self.pad) for p in (q, q)]
            x = Value(torch.nn.functional.pad(x.dense(), spec, value=self.pad_value))
        cand = self.chooser.choose(self.name, kernel, x, self.dilation)
        self.chosen = cand.describe()
        out = kernel.run(x.to(cand.levels).t, cand.r)
        fmt = preferred_format(out)  # oneDNN returns NCHW for 1-channel input; keep NHWC downstream
        if not out.is_contiguous(memory_format=fmt):
            out = out.contiguous(memory_format=fmt)
        return Value(out, cand.levels)


class PointwiseStep(Step):
    """Applies ``fn`` position by position (activations, BatchNorm, residual add, LRN, ...).

    Dense inputs are brought to one layout and cut to a common size; for feature vectors
    (patch net ``(N, F)``) tensor constants get trailing unit axes so they broadcast over channels.
    """

    def __init__(self, fn: Callable, label: str, vector_nd: int = 0, inplace: Callable | None = None):
        self.fn, self.label, self.vector_nd, self.inplace = fn, label, vector_nd, inplace

    def run_inplace(self, x: Value) -> Value:
        """Inference only, when ``x`` is read by nobody else: saves allocating a full-size map,
        which costs as much as the activation itself at image size."""
        self.inplace(x.t)
        return x

    def __call__(self, *args, **kwargs):
        values: list[Value] = []
        fx.node.map_aggregate((args, kwargs), lambda a: values.append(a) if isinstance(a, Value) else None)
        levels = values[0].levels
        tensors = crop_to_common([v.to(levels) for v in values])

        def call(dense: list[torch.Tensor]) -> torch.Tensor:
            it = iter(dense)

            def sub(a):
                if isinstance(a, Value):
                    return next(it)
                if self.vector_nd and isinstance(a, torch.Tensor) and a.dim() >= 1:
                    return a.reshape(*a.shape, *(1,) * self.vector_nd)
                return a

            a, k = fx.node.map_aggregate((args, kwargs), sub)
            return self.fn(*a, **k)

        if exact_pointwise(tensors[0]):
            return Value(pixel_chunked(call, tensors), levels)
        return Value(call(tensors), levels)


class CatStep(Step):
    label = "concatenate channels"

    def __call__(self, tensors, *args, **kwargs) -> Value:
        levels = tensors[0].levels
        parts = crop_to_common([v.to(levels) for v in tensors])
        return Value(torch.cat(parts, dim=1), levels)


class IdentityStep(Step):
    def __init__(self, label: str):
        self.label = label

    def __call__(self, x, *args, **kwargs):
        return x


class OriginalStep(Step):
    """Runs the node as the patch net does (values that do not depend on the image)."""

    def __init__(self, node: fx.Node, root: nn.Module):
        self.node, self.root = node, root

    def __call__(self, *args, **kwargs):
        n = self.node
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "call_module":
            return self.root.get_submodule(n.target)(*args, **kwargs)
        if n.op == "get_attr":
            return get_attr(self.root, n.target)
        raise AssertionError(n.op)


class SizeStep(Step):
    """``x.size(...)`` / ``x.shape`` on a dense input: the patch net's sizes, the image's batch."""

    def __init__(self, patch_value, has_batch: bool):
        self.patch_value, self.has_batch = patch_value, has_batch

    def __call__(self, x: Value, *args, **kwargs):
        v = self.patch_value
        if not self.has_batch:
            return v
        if isinstance(v, tuple):
            return torch.Size((x.batch, *v[1:]))
        return x.batch


_SHAPE_BATCH = 2  # batch size of the patch-net shape run; must differ from 1 so batch is visible


class Tracer(fx.Tracer):
    """torch.nn modules are leaves (as usual) and so is every module type with a dense rule;
    everything else (a user's blocks) is traced through into functions we know."""

    def __init__(self, leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) in self.leaf_types:
            return True
        return super().is_leaf_module(m, qualname)


class _Recorder(fx.Interpreter):
    def __init__(self, root: nn.Module, graph: fx.Graph):
        super().__init__(root, graph=graph)
        self.values: dict[str, object] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
        self.values[n.name] = out
        return out


@dataclass
class Converter:
    """Holds the traced graph and the patch-net facts the rules need."""

    model: nn.Module
    patch: Factors
    exact: bool
    graph: fx.Graph = field(init=False)
    values: dict[str, object] = field(init=False)
    shapes: dict[str, tuple[int, ...]] = field(init=False)
    infos: dict[str, Info] = field(init=False, default_factory=dict)

    def trace(self, leaf_types: tuple[type, ...]) -> None:
        """Trace the model, keeping ``leaf_types`` (every module type with a dense rule) whole."""
        try:
            graph = Tracer(leaf_types).trace(self.model)
        except Exception as exc:  # fx raises many types for data-dependent Python control flow
            raise UnsupportedLayerError(
                f"cannot trace {type(self.model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
                "write the forward without data-dependent control flow") from None
        self.graph = graph  # run against the model itself: no GraphModule code generation

    @property
    def nd(self) -> int:
        return len(self.patch)

    def guess_in_channels(self) -> int:
        """The first convolution's input channels (in graph order), or a leading Linear's."""
        import torch.nn.functional as F

        for node in self.graph.nodes:
            if node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.conv3d):
                w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
                if isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(groups, int):
                    return get_attr(self.model, w.target).shape[1] * groups
                break
            if node.op == "call_module":
                m = self.model.get_submodule(node.target)
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    return m.in_channels
                if isinstance(m, nn.Linear) and m.in_features % prod(self.patch) == 0:
                    return m.in_features // prod(self.patch)
                if isinstance(m, nn.Linear):
                    break
        raise ConfigError("cannot tell how many channels the model reads (its first layer is not a "
                          "convolution); pass in_channels=")

    def run_patch_net(self, in_channels: int, device: torch.device, dtype: torch.dtype) -> None:
        """One run on a patch-sized input records every node's shape (and plain Python values)."""
        x = torch.zeros(_SHAPE_BATCH, in_channels, *self.patch, device=device, dtype=dtype)
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()  # BatchNorm must not update its running statistics here
        rec = _Recorder(self.model, self.graph)
        try:
            with torch.no_grad():
                rec.run(x)
        except UnsupportedLayerError:
            raise
        except Exception as exc:
            size = "x".join(map(str, self.patch))
            raise ConfigError(f"the model cannot take a {in_channels}-channel {size} patch "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                              "check patch_size and in_channels") from None
        finally:
            for m, mode in modes.items():
                m.train(mode)
        self.values, self.shapes = rec.values, rec.shapes

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        """The node's tensor shape in the patch-net run (batch 2), None for non-tensors."""
        return self.shapes.get(node.name)

    def concrete(self, arg):
        """An argument's value in the patch net (nodes replaced by what the shape run saw)."""
        return fx.node.map_arg(arg, lambda n: self.values[n.name])

    def refuse(self, node: fx.Node, reason: str):
        raise UnsupportedLayerError(f"layer {layer_name(node)}: {reason}")

    def dense_inputs(self, node: fx.Node) -> list[Info]:
        out = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(self.infos[n.name]))
        return [i for i in out if i.is_dense or i.kind == "parts"]

    def info_from_shape(self, node: fx.Node, like: Info) -> Info:
        """Info of a node whose patch-net shape says what it is, with ``like``'s d and extent."""
        shape = self.shape(node)
        if shape is None or shape[0] != _SHAPE_BATCH:
            self.refuse(node, "does not produce a per-patch tensor")
        if len(shape) == 2 + self.nd:
            return replace(like, kind="map", channels=shape[1], spatial=tuple(shape[2:]))
        if len(shape) == 2:
            if like.kind == "flat" and like.channels * prod(like.spatial) == shape[1]:
                return like
            return replace(like, kind="flat", channels=shape[1], spatial=(1,) * self.nd)
        self.refuse(node, f"patch-net output shape {shape} is neither (N, C, *spatial) nor (N, F)")


def get_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def layer_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target!r}"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name!r} ({target})"
