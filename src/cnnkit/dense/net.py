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

import torch
from torch import nn

from cnnkit.dense.convert import DenseCore, Info, SpatialStep, convert
from cnnkit.dense.ops import LAYOUTS, LayoutChooser, preferred_format, prod
from cnnkit.dense.tiling import BORDERS, pad_image, run_tiled, tile_side
from cnnkit.errors import ConfigError, UnsupportedLayerError

log = logging.getLogger(__name__)

_1D = (nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
_3D = (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.BatchNorm3d)


class DenseNet(nn.Module):
    """Pads the image once, runs the converted graph (in tiles if asked) and crops to H x W."""

    def __init__(self, core: DenseCore, patch: tuple[int, ...], in_channels: int, num_classes: int,
                 ext: tuple[int, ...], border: str, max_memory: int | None, tile_size, exact: bool,
                 bytes_per_pixel: int, align: int):
        super().__init__()
        self.core = core
        self.patch, self.in_channels, self.num_classes = patch, in_channels, num_classes
        self.border, self.exact, self.align = border, exact, align
        # exact nets never read past their patch (ext <= P - 1); approximate ones may need more
        self.extra = tuple(max(0, e - (p - 1)) for e, p in zip(ext, patch))
        self.bytes_per_pixel = bytes_per_pixel
        self.max_memory = max_memory
        self.tile_size = None if tile_size is None else _tuple(tile_size, len(patch), "tile_size")

    @property
    def model(self) -> nn.Module:
        return self.core.model

    def tile_for(self, size: Sequence[int], itemsize: int, batch: int = 1) -> tuple[int, ...] | None:
        """Tile shape for an image of ``size`` (None: no tiling). The largest tile allowed is cut
        into equal tiles per axis, so no work is spent on a mostly empty last tile."""
        if self.tile_size is not None:
            largest = self.tile_size
        elif self.max_memory is not None:
            bpp = self.bytes_per_pixel * itemsize // 4 * batch
            largest = (tile_side(self.max_memory, bpp, self.patch, self.align),) * len(size)
        else:
            return None
        if all(t >= n for t, n in zip(largest, size)):
            return None
        return tuple(-(-n // -(-n // t)) for t, n in zip(largest, size))

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
        xp = pad_image(x, self.patch, self.border, self.extra)
        xp = xp.contiguous(memory_format=preferred_format(xp))
        tile = self.tile_for(size, x.element_size(), x.shape[0])
        if tile is None:
            y = self.core(xp)
            return y[(..., *(slice(0, n) for n in size))]
        return run_tiled(self.core, xp, size, tuple(p + e for p, e in zip(self.patch, self.extra)), tile)

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
    max_memory / tile_size: process the image in tiles (halo P - 1) so that the dense net's working
        memory for one tile stays near ``max_memory`` bytes (estimated from the widest layer; the
        padded input and the K x H x W output come on top); the result is identical (bit for bit
        in float64).

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
    # a tile's working set: the widest step's inputs and output three times over (layout copies,
    # oneDNN reorders). Descriptor net: 3.0 KB per input pixel estimated; 1080 x 720 in tiles under
    # max_memory=1e9 peaked at 1.17 GB (with the 0.4 GB output), untiled at 2.0 GB (0.9 M pixels)
    widest = max([in_channels] + [3 * _width(cv.infos, node) for node, _ in steps])
    align = max(max(i.d) for i in cv.infos.values() if i.is_dense)
    net = DenseNet(core, patch, in_channels, info.channels, info.ext, border, max_memory, tile_size, exact,
                   bytes_per_pixel=4 * widest, align=align)
    log.debug("densified %s: %d steps", type(model).__name__, len(steps))
    return net


def _width(infos: dict[str, Info], node) -> int:
    out = infos[node.name]
    ins = [infos[n.name] for n in node.all_input_nodes if n.name in infos]
    return sum(i.channels for i in ins if i.is_dense) + (out.channels if out.is_dense else 0)
