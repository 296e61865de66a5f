"""``densify``: any supported patch classifier -> a network that classifies every pixel in one pass.

    dense = densify(model, 65)              # model: (N, C, 65, 65) -> (N, K) scores
    scores = dense(image)                   # (N, C, H, W) -> (N, K, H, W), any H and W

``scores[:, :, i, j]`` equals ``model`` on the patch around pixel (i, j) (centring convention in
:mod:`cnnkit.dense.tiling`), computed as in Li, Zhao and Wang (arXiv:1412.4526): strides set to 1,
FC layers turned into convolutions, kernels dilated by the accumulated stride. The dense net
shares the patch classifier's parameters: a loss on its output trains ``model`` itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cnnkit.dense.convert import DenseCore, SpatialStep, convert
from cnnkit.dense.memory import (
    SAFETY,
    Trace,
    default_max_memory,
    load_tracer,
    overhead,
    tile_peak,
    too_small,
)
from cnnkit.dense.ops import LAYOUTS, LayoutChooser, preferred_format, prod
from cnnkit.dense.tiling import BORDERS, pad_image, run_tiled
from cnnkit.errors import ConfigError, UnsupportedLayerError

log = logging.getLogger(__name__)

_1D = (nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
_3D = (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Plan:
    """How one call runs: ``tile`` (None: the whole image at once), the budget it was sized for,
    and the predicted peak bytes above the process's state (both None when ``tile_size`` was
    given, and under autograd with no ``max_memory``)."""

    tile: tuple[int, ...] | None
    budget: int | None
    predicted: int | None


class DenseNet(nn.Module):
    """Pads the image once, runs the converted graph (in tiles if needed) and crops to H x W."""

    def __init__(self, core: DenseCore, patch: tuple[int, ...], in_channels: int, num_classes: int,
                 ext: tuple[int, ...], border: str, max_memory: int | None, tile_size, exact: bool,
                 align: int):
        super().__init__()
        self.core = core
        self.patch, self.in_channels, self.num_classes = patch, in_channels, num_classes
        self.border, self.exact, self.align = border, exact, align
        # exact nets never read past their patch (ext <= P - 1); approximate ones may need more
        self.extra = tuple(max(0, e - (p - 1)) for e, p in zip(ext, patch))
        self.max_memory = max_memory
        self.tile_size = None if tile_size is None else _tuple(tile_size, len(patch), "tile_size")
        self._plans: dict[tuple, Plan] = {}
        self._provisional = False

    @property
    def model(self) -> nn.Module:
        return self.core.model

    @property
    def halo(self) -> tuple[int, ...]:
        return tuple(p - 1 + e for p, e in zip(self.patch, self.extra))

    def tile_for(self, size: Sequence[int], itemsize: int, batch: int = 1) -> tuple[int, ...] | None:
        """Tile shape for an image of ``size`` (None: no tiling), see :meth:`plan`."""
        dtype = {8: torch.float64, 4: torch.float32, 2: torch.bfloat16}[itemsize]
        return self.plan(size, dtype, batch).tile

    def plan(self, size: Sequence[int], dtype: torch.dtype = torch.float32, batch: int = 1,
             device: torch.device | None = None) -> Plan:
        """The tiles for an image of ``size``: ``tile_size`` if set, else, among near-square tiles
        whose predicted peak fits ``max_memory`` (when None, the default budget of
        :func:`~cnnkit.dense.memory.default_max_memory`), those with the fewest multiply-adds, halo
        included. Tiles are equal along each axis, so no work is spent on a mostly empty last
        tile. Under autograd with no ``max_memory``: no tiles (every tile's saved maps stay until
        backward, so tiles save nothing)."""
        size = tuple(size)
        if self.tile_size is not None:
            return Plan(_balanced(self.tile_size, size), None, None)
        device = device or _device(self.core.model)
        key = (size, dtype, batch, device, torch.is_grad_enabled(), self.max_memory)
        if key in self._plans:
            return self._plans[key]
        self._provisional = False
        plan = self._plan(size, dtype, batch, device)
        if not self._provisional:  # layouts still to be timed: plan again once they are chosen
            self._plans[key] = plan
        return plan

    def _plan(self, size: tuple[int, ...], dtype: torch.dtype, batch: int, device: torch.device) -> Plan:
        item = torch.empty((), dtype=dtype).element_size()
        padded = [n + h for n, h in zip(size, self.halo)]
        image = batch * self.in_channels * prod(padded) * item
        output = batch * self.num_classes * prod(size) * item
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.core.model.parameters())
        if self.max_memory is None and training:
            return Plan(None, None, None)  # the default budget is for inference: tiles save no memory here
        budget = self.max_memory or default_max_memory(image + output, device)
        traces: dict[tuple, Trace] = {}

        def predict(tile: Sequence[int] | None) -> int:
            # untiled, the core's output is the call's output; tiled, tiles are copied into it
            shape = padded if tile is None else [min(t, n) + h for t, n, h in zip(tile, size, self.halo)]
            key = (tuple(shape), len(self.core.chooser.cache))
            if key not in traces:
                traces[key] = tile_peak(self.core, (batch, self.in_channels, *shape), dtype, device)
            trace = traces[key]
            self._provisional |= trace.provisional
            fixed = image + overhead(device, trace.timing)
            if tile is None:
                return fixed + int(trace.peak * SAFETY)
            # under autograd every tile keeps its saved maps until backward
            earlier = (prod(-(-n // t) for n, t in zip(size, tile)) - 1) * trace.kept if training else 0
            return fixed + output + int((trace.peak + earlier) * SAFETY)

        whole = predict(None)
        if whole <= budget:
            return Plan(None, budget, whole)
        nd = len(size)
        smallest = predict((1,) * nd)
        if smallest > budget:
            raise too_small(budget, smallest, image + output)
        lo = self._largest(lambda v: predict((v,) * nd) <= budget, max(size))  # square (cube) tiles
        if nd == 1:
            tile = _balanced((lo,), size) or size
            return Plan(tile, budget, predict(tile))
        # near-square tiles with a balanced first axis: the fewest multiply-adds, halo included
        best = None
        near = -(-size[0] // min(lo, size[0]))
        for rows in sorted({max(1, near - 1), near, near + 1}):
            first = -(-size[0] // rows)
            if predict((first,) + (1,) * (nd - 1)) > budget:
                continue
            tile = self._widest(first, size, budget, predict)
            work = prod(-(-n // t) for n, t in zip(size, tile)) * self.macs(tile)
            if best is None or work < best[0]:
                best = (work, tile)
        tile = best[1]
        return Plan(tile, budget, predict(tile))

    def _widest(self, first: int, size: tuple[int, ...], budget: int, predict) -> tuple[int, ...]:
        """Tiles ``first`` long on the first axis (which fits 1 wide), as wide as fits on the others
        (equal sides), balanced."""
        rest = size[1:]
        side = self._largest(lambda v: predict((first,) + (v,) * len(rest)) <= budget, max(rest))
        return (first,) + tuple(-(-n // -(-n // min(side, n))) for n in rest)

    def _largest(self, fits, most: int) -> int:
        """The largest side in 1 ... ``most`` that ``fits`` (1 does), searched in multiples of the
        net's largest dilation when that fits: tiles aligned to it split evenly into phases, and
        each prediction is a trace."""
        step = self.align if self.align <= most and fits(self.align) else 1
        lo, hi = 1, most // step  # fits(lo * step) holds
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid * step) else (lo, mid - 1)
        return lo * step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.patch)
        if x.dim() != nd + 2:
            axes = "N x C x " + " x ".join("DHW"[-nd:])
            raise ConfigError(f"image batch has shape {tuple(x.shape)}; expected {axes}")
        if x.shape[1] != self.in_channels:
            raise ConfigError(f"image has {x.shape[1]} channels but the model takes {self.in_channels}; "
                              "convert the image (e.g. grey <-> RGB) first")
        param = next(self.core.model.parameters(), None)
        if (param is not None and x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type)):
            raise ConfigError(f"image dtype {x.dtype} differs from the model's {param.dtype}; convert one")
        size = tuple(x.shape[2:])
        self.last_plan = self.plan(size, x.dtype, x.shape[0], x.device)
        tile = self.last_plan.tile
        xp = pad_image(x, self.patch, self.border, self.extra)
        xp = xp.contiguous(memory_format=preferred_format(xp))
        if tile is None:
            y = self.core(xp)
            return y[(..., *(slice(0, n) for n in size))]
        out = None  # under autocast the output's dtype is known only after the first tile
        if not torch.is_autocast_enabled(x.device.type):
            # the maps' layout (channels_last in 2D): each tile's copy into it runs along memory
            out = torch.empty((x.shape[0], self.num_classes, *size), dtype=x.dtype, device=x.device,
                              memory_format=preferred_format(xp))
        return run_tiled(self.core, xp, size, tuple(h + 1 for h in self.halo), tile, out)

    def macs(self, size: Sequence[int], batch: int = 1) -> int:
        """Multiply-accumulates of the dense net's convolutions and FC layers for images of ``size``
        (pooling and activations not counted; FLOPs = 2 x MACs)."""
        total = 0
        for _, step in self.core.steps:
            if isinstance(step, SpatialStep) and step.macs:
                span = [n + p - 1 + e - x for n, p, e, x in zip(size, self.patch, self.extra, step.out_ext)]
                total += step.macs * prod(span)
        return total * batch

    def patch_macs(self) -> int:
        """Multiply-accumulates of the patch classifier on one patch (same layers counted)."""
        return sum(s.macs * s.patch_positions for _, s in self.core.steps if isinstance(s, SpatialStep))

    def layers(self) -> list[dict]:
        """The converted layers: what each became, its dense dilation and the layout chosen."""
        rows = []
        for node, step in self.core.steps:
            if step.label == "" or node.op == "get_attr":
                continue
            row = {"name": node.target if node.op == "call_module" else node.name, "op": step.label}
            if isinstance(step, SpatialStep):
                row["dilation"] = step.dilation
                row["layout"] = step.chosen or "(not run yet)"
            rows.append(row)
        return rows

    def extra_repr(self) -> str:
        return (f"patch={self.patch}, in_channels={self.in_channels}, num_classes={self.num_classes}, "
                f"border={self.border!r}, exact={self.exact}, mode={self.core.chooser.mode!r}")


def _tuple(v, nd: int, name: str) -> tuple[int, ...]:
    t = tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * nd
    if len(t) != nd or min(t) < 1:
        raise ConfigError(f"{name} must be a positive int or {nd} positive ints, got {v!r}")
    return t


def _spatial_dims(model: nn.Module, patch_size) -> int:
    if isinstance(patch_size, (tuple, list)):
        return len(patch_size)
    if any(isinstance(m, _3D) for m in model.modules()):
        return 3
    return 1 if any(isinstance(m, _1D) for m in model.modules()) else 2


def densify(model: nn.Module, patch_size, *, border: str = "zeros", exact: bool = True, mode: str = "auto",
            max_memory: int | None = None, tile_size=None, in_channels: int | None = None) -> DenseNet:
    """Turn patch classifier ``model`` into a dense net ``(N, C, *L) -> (N, K, *L)``.

    patch_size: int or tuple (one per spatial axis; 1D nets on (N, C, L), 2D nets and 3D nets on
        volumes (N, C, D, H, W) are supported; an int means the same size on every axis, and the
        number of axes is read off the model's layer types: 3D if it has a Conv3d, pooling or
        BatchNorm3d, 1D if a Conv1d or 1D pooling, else 2D).
    border: how the image is padded so border pixels have a patch: "zeros", "reflect", "replicate".
    exact: refuse (UnsupportedLayerError naming the layer) what cannot be exact: zero padding inside
        the patch net, ceil-mode pooling with a partial window. ``exact=False`` converts those
        approximately: the padding/partial window is applied at the border of the whole map, so
        interior pixels see their neighbours where the patch saw zeros.
    mode: "dilated" (Li et al.'s d-regularly sparse kernels), "space_to_batch" (multipool /
        shift-and-stitch), or "auto": per layer the faster one on this machine, timed once.
    max_memory: upper bound, in bytes, on the call's peak memory above the process's state (resident
        set on CPU, ``torch.cuda.max_memory_allocated`` on CUDA). The image is cut into the fewest
        tiles (halo P - 1) whose predicted peak fits; :mod:`cnnkit.dense.memory` predicts it by
        tracing the dense graph on fake tensors (no data) plus measured allowances. The output and
        the padded image cannot be tiled away: a budget below them plus the smallest tile raises
        ConfigError naming the minimum. None (default): the output and padded image plus 512 MB
        for the tiles (or half the memory still available, if less); the descriptor net at
        1080 x 720 then peaks at 0.75 GB at 0.93x the untiled speed (benchmarks/dense.py, 2 threads).
        Results are identical whatever the tiles (bit for bit in float64).
    tile_size: int or tuple: use tiles of this size instead (no memory prediction).

    BatchNorm and Dropout act as in eval mode. Under ``torch.autocast`` (bfloat16/float16) the
    result is approximate, as for the patch net itself.
    """
    if border not in BORDERS:
        raise ConfigError(f"unknown border {border!r}; use one of {', '.join(BORDERS)}")
    if mode not in LAYOUTS:
        raise ConfigError(f"unknown mode {mode!r}; use one of {', '.join(LAYOUTS)}")
    nd = _spatial_dims(model, patch_size)
    patch = _tuple(patch_size, nd, "patch_size")
    if nd not in (1, 2, 3):
        raise ConfigError(f"patch_size {patch_size!r}: only 1D, 2D and 3D patch nets are supported")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    cv, steps, output, info = convert(model, patch, in_channels, exact, device, dtype)
    in_channels = cv.in_channels
    if exact and any(e > p - 1 for e, p in zip(info.ext, patch)):
        raise UnsupportedLayerError(f"internal: dense extent {info.ext} exceeds patch {patch}")
    chooser = LayoutChooser(mode)
    placeholder = next(n.name for n in cv.graph.nodes if n.op == "placeholder")
    core = DenseCore(model, steps, placeholder, output, chooser)
    align = max(max(i.d) for i in cv.infos.values() if i.is_dense)
    net = DenseNet(core, patch, in_channels, info.channels, info.ext, border, max_memory, tile_size, exact,
                   align=align)
    if tile_size is None:
        load_tracer()  # the memory model's tracer: part of the process's state before the first call
    log.debug("densified %s: %d steps", type(model).__name__, len(steps))
    return net


def _balanced(largest: Sequence[int], size: Sequence[int]) -> tuple[int, ...] | None:
    """Equal tiles no larger than ``largest`` covering ``size``; None when one tile covers it."""
    if all(t >= n for t, n in zip(largest, size)):
        return None
    return tuple(-(-n // -(-n // t)) for t, n in zip(largest, size))


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
