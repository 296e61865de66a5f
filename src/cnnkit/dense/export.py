"""Write a dense net as ONNX: ``(N, C, H, W) -> (N, K, H, W)`` with N, H and W dynamic (1D nets:
``(N, C, L) -> (N, K, L)``, N and L dynamic; 3D nets: ``(N, C, D, H, W) -> (N, K, D, H, W)``, all dynamic).

    export_onnx(densify(model, 65, border="reflect"), "dense.onnx")

The exported graph is the whole :class:`~cnnkit.dense.net.DenseNet` forward: the border padding
(zeros, reflect or replicate become one ONNX ``Pad``), the converted layers and the final crop to
H x W, so an ONNX runtime is given the raw image exactly as the PyTorch dense net is.

Layout: the graph is recorded in the "dilated" layout (Li et al.'s d-regularly sparse kernels:
ONNX ``Conv`` and ``MaxPool`` carry ``dilations``), whatever mode the net was built with. The
space-to-batch layout reshapes by split factors computed from the map size in Python, which a
traced graph would freeze to the traced size; the dilated layout computes the same numbers with
shape-independent ops. Tiling (``max_memory``/``tile_size``) is not exported either: the ONNX
graph processes the image in one piece.

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript tracer, with ``dynamic_axes``:
still present in torch 2.13, it needs no package beyond torch, and sizes read off the input while
tracing stay symbolic (``Shape``/``Slice`` in the graph), so one trace serves every N, H and W. The
default dynamo exporter needs ``onnxscript`` as an extra dependency and ``torch.export`` of the dense
forward (Python dicts of per-layer layout objects); it was not needed here. ``verify=True`` runs the
written file in onnxruntime on another batch and size and compares it with PyTorch before keeping it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cnnkit.dense.graph import SpatialStep, Value, layer_name
from cnnkit.dense.ops import LayoutChooser
from cnnkit.dense.tiling import pad_image
from cnnkit.errors import CnnkitError, ConfigError
from cnnkit.utils import atomic_path

log = logging.getLogger(__name__)

OPSET = 17  # Pad with reflect/edge modes (11), MaxPool dilations (10); onnxruntime runs it on CPU
INSTALL = "pip install onnx onnxruntime"


class ExportError(CnnkitError):
    """The dense net (or one of its layers) cannot be written as ONNX."""


class _Traceable(nn.Module):
    """The dense forward without what a trace cannot hold: no in-place steps (they test storage
    pointers), no tiling, no layout timing (dilated layout pinned by the caller)."""

    def __init__(self, dense: nn.Module):
        super().__init__()
        self.dense = dense
        self.current: str | None = None  # the layer running now (named in export errors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dense
        core = d.core
        xp = pad_image(x, d.patch, d.border, d.extra)
        env: dict[str, object] = {core.input_name: Value(xp)}
        for (node, step), free in zip(core.steps, core._free):
            args = fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
            self.current = layer_name(node)
            try:
                env[node.name] = step(*args, **kwargs)
            except CnnkitError:
                raise
            except Exception as exc:
                raise ExportError(f"layer {layer_name(node)} cannot be traced for ONNX export "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
            for name in free:
                del env[name]
        y = env[core.output].dense()  # (N, K, *(padded - ext))
        return y[(..., *(slice(0, n) for n in x.shape[2:]))]  # (N, K, H, W)


class _OpRecorder(TorchDispatchMode):
    """Notes the first layer that calls each aten op (to name the layer an exporter refuses)."""

    def __init__(self, wrapper: _Traceable):
        super().__init__()
        self.wrapper, self.first = wrapper, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.first.setdefault(name, self.wrapper.current)
        return func(*args, **(kwargs or {}))


def _layer_calling(wrapper: _Traceable, x: torch.Tensor, op: str) -> str | None:
    rec = _OpRecorder(wrapper)
    try:
        with torch.no_grad(), rec:
            wrapper(x)
    except Exception:
        return None
    return rec.first.get(op)


@contextlib.contextmanager
def _quiet_stdout():
    """The TorchScript exporter prints its whole IR graph to the process's stdout (from C++) when it
    fails; the CLI's error is one line, so file descriptor 1 goes to a scratch file meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 1)
            try:
                yield
            finally:
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def _onnx_modules():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError(f"ONNX export needs the onnx package; {INSTALL}") from None


def export_onnx(dense: nn.Module, path: str | Path, *, sample_size=None, opset: int = OPSET,
                verify: bool = True) -> Path:
    """Write ``dense`` (a :class:`DenseNet` from ``densify``) to ``path`` as ONNX, atomically.

    Input ``image`` (N, C, H, W) float32, output ``scores`` (N, K, H, W); N, H, W are dynamic.
    Returns ``path``. The net itself is left as it was (layout choices, train/eval mode).
    ``sample_size``: the H x W traced (default: twice the patch, above every reflect limit).
    ``verify``: run the file in onnxruntime on a second size and compare with PyTorch (needs
    onnxruntime; raises ExportError on a mismatch). Errors are :class:`CnnkitError` subclasses.
    """
    _onnx_modules()
    nd = len(dense.patch)
    param = next(dense.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if dtype != torch.float32:
        raise ExportError(f"the dense net is {dtype}; export a float32 net (model.float())")
    size = tuple(sample_size or (2 * p + 3 for p in dense.patch))
    x = torch.randn(2, dense.in_channels, *size, device=device, dtype=dtype)
    steps = [s for _, s in dense.core.steps if isinstance(s, SpatialStep)]
    saved = [(s.chooser, s.chosen) for s in steps]
    modes = {m: m.training for m in dense.modules()}
    pinned = LayoutChooser("dilated")
    names = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}[nd]
    axes = {0: "batch", **{2 + i: name for i, name in enumerate(names)}}  # dynamic input/output axes
    path = Path(path)
    try:
        for s in steps:
            s.chooser = pinned
        dense.eval()
        wrapper = _Traceable(dense).eval()
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python ints: shapes stay dynamic
            try:
                with _quiet_stdout():
                    torch.onnx.export(wrapper, (x,), str(tmp), dynamo=False, opset_version=opset,
                                      input_names=["image"], output_names=["scores"],
                                      dynamic_axes={"image": axes, "scores": axes})
            except CnnkitError:
                raise
            except Exception as exc:
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                op = re.search(r"operator '(aten::\w+)'", text)
                where = _layer_calling(wrapper, x, op.group(1)) if op else None
                raise ExportError(f"{'layer ' + where if where else 'the dense net'} cannot be exported to "
                                  f"ONNX opset {opset} ({text}); replace that op, or use the PyTorch dense "
                                  "net") from None
            if verify:
                _verify(wrapper, tmp, dense.in_channels, size, device)
    finally:
        for s, (chooser, chosen) in zip(steps, saved):
            s.chooser, s.chosen = chooser, chosen
        for m, mode in modes.items():
            m.train(mode)
    log.debug("wrote %s (opset %d, dilated layout)", path, opset)
    return path


def _verify(wrapper: nn.Module, file: Path, channels: int, size, device: torch.device) -> None:
    """Run the written file on another batch and size; a wrong graph must not be kept."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed: %s written unchecked (%s)", file, INSTALL)
        return
    other = tuple(n + 5 for n in size)
    x = torch.randn(1, channels, *other, device=device)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"image": x.cpu().numpy()})[0]
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot run the exported graph ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    with torch.no_grad():
        ref = wrapper(x).cpu()
    if tuple(got.shape) != tuple(ref.shape):
        raise ExportError(f"exported graph gives shape {tuple(got.shape)} for a {other} image, "
                          f"PyTorch {tuple(ref.shape)}: a size was frozen while tracing")
    diff = (torch.from_numpy(got) - ref).abs().max().item()
    if diff > 1e-4 * max(1.0, ref.abs().max().item()):
        raise ExportError(f"exported graph differs from PyTorch by {diff:.3g} on a {other} image")


__all__ = ["export_onnx", "ExportError"]
