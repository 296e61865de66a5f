"""Peak memory of a dense call, predicted before it runs, and the tile that keeps it under a budget.

What a dense call holds at its busiest moment (CPU, PyTorch 2.13 with oneDNN, measured):

- for the whole call: the padded image and the N x K x H x W output that the tiles are written into;
- per tile: the maps the converted graph holds at its busiest step: a layer's inputs and output,
  space-to-batch copies, the int64 indices that CPU ``max_pool2d`` allocates even without autograd
  (it calls ``max_pool2d_with_indices``: output and indices take 3x the float32 output's bytes),
  the maps autograd saves;
- per convolution: oneDNN's scratchpad and reordered weights, 10-13 MB for the descriptor net's
  layers at 300^2 to 1200^2 pixels and 1 to 8 threads (independent of both), on top of the output.

The per-tile part is traced, not estimated from a formula: :func:`tile_peak` runs the dense graph
on fake tensors (shapes only, no data, no arithmetic, milliseconds), with the layouts the chooser
picked, and adds up the storages alive after every ATen op. What the trace cannot see (oneDNN
workspace, allocator overhead) is a calibrated allowance; the benchmark prints predicted and
measured peaks side by side (benchmarks/dense.py) and tests/test_dense_memory.py checks the bound
in fresh processes.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from cnnkit.dense.graph import SpatialStep
from cnnkit.errors import ConfigError

MB = 2**20
# oneDNN scratchpad and weight reorders of one convolution: 10-13 MB measured, whatever the size
CONV_WORKSPACE = 16 * MB
# What the trace does not see, calibrated on the descriptor net at 1080 x 720 (tiles 180 x 216 to
# 360 x 360) and on the toy, segment and Liskowski nets, in fresh processes, with glibc malloc as it
# is and keeping freed memory (dense/allocator.py): the traced peak times SAFETY (measured up to
# 1.02x once layouts are chosen), plus PER_CALL (oneDNN primitives and jitted kernels, Python
# objects: 10-26 MB measured), plus, on a call whose layouts are still to be timed, TIMING times
# the bytes the timing allocates (its inputs and outputs, summed over layers: 160-260 MB for those
# tiles): allocated between the first tile's maps, they fragment the heap (85-131 MB measured
# above the trace keeping freed memory, less with malloc as it is)
SAFETY = 1.2
PER_CALL = 32 * MB
TIMING = 0.8
# the working set a tile may use when no budget is given (see default_max_memory)
DEFAULT_WORKING_SET = 512 * MB

_CONVS = {torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default}


class _LiveBytes(TorchDispatchMode):
    """Adds up the bytes of tensor storages alive after every op; a convolution adds its workspace."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, n) in list(self.refs.items()):
            if ref.expired():
                self.live -= n
                del self.refs[key]
        flat = out if isinstance(out, (tuple, list)) else [out]
        for t in flat:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.refs:
                    n = t.untyped_storage().nbytes()
                    self.refs[ref.cdata] = (ref, n)
                    self.live += n
        work = CONV_WORKSPACE + 2 * _weight_bytes(args) if func in _CONVS else 0
        self.peak = max(self.peak, self.live + work)
        return out


def _weight_bytes(args) -> int:
    w = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
    return 0 if w is None else w.numel() * w.element_size()


def _same_storage_check(env: dict, node, x: torch.Tensor) -> bool:
    """DenseCore._unshared for fake tensors (whose data pointers are all 0): storages compared by
    identity, so the trace runs activations in place exactly where the real call does."""
    name = node.all_input_nodes[0].name
    key = StorageWeakRef(env[name].t.untyped_storage()).cdata
    alive = [v for k, v in env.items() if k != name]
    alive += [p for v in alive if isinstance(v, tuple) for p in v]
    others = [v.t for v in alive if hasattr(v, "levels")] + [x]
    return all(StorageWeakRef(t.untyped_storage()).cdata != key for t in others)


class Trace(NamedTuple):
    peak: int  # bytes alive at the busiest moment, the tile and convolution workspace included
    kept: int  # bytes alive when the core returns: its output and, under autograd, saved maps
    timing: int  # bytes the layout timing allocates, summed over the layers still to be timed
    provisional: bool  # some layout is still to be timed: a later call may run other layouts


def tile_peak(core, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Trace:
    """Traces ``core`` on one padded tile of ``shape`` (N, C, *L), see :class:`Trace`.

    A layer whose layout is not chosen yet will be timed on its first real call, on a cut of its
    input (``ops._proxy``): the trace allocates those timing inputs and outputs too, and assumes the
    candidate that allocates the most. Runs under the caller's grad mode, so maps saved for
    backward count when autograd is on.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    _timing.clear()
    spatial = [s for _, s in core.steps if isinstance(s, SpatialStep)]
    real, chosen = core.chooser, [s.chosen for s in spatial]
    trace = copy.copy(real)
    trace.cache = dict(real.cache)  # choices made while tracing stay in the trace
    trace._measure = _largest  # instance attribute: shadows the timing method
    fmt = torch.channels_last if len(shape) == 4 and dtype != torch.float64 else torch.contiguous_format
    core._unshared = _same_storage_check  # likewise shadows the static method
    for s in spatial:
        s.chooser = trace
    try:
        with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            warnings.simplefilter("ignore")  # fake tensors warn about data_ptr
            with _LiveBytes() as live:
                x = mode.from_tensor(torch.empty(0, dtype=dtype, device=device)).new_empty(shape)
                x = x.contiguous(memory_format=fmt)
                y = core(x)
                del x
                kept = live.live
                del y
    finally:
        del core._unshared
        for s, c in zip(spatial, chosen):
            s.chooser, s.chosen = real, c
    return Trace(live.peak, kept, sum(_timing), len(trace.cache) > len(real.cache))


_timing: list[int] = []  # per layer timed in the current trace: bytes its timing allocates


def _largest(kernel, value, options):
    """LayoutChooser._measure for the trace: run every candidate on the (fake) timing input as the
    real chooser will, and assume the one whose input copy and output take the most bytes."""
    def cost(cand) -> int:
        t = value.to(cand.levels).t
        out = kernel.run(t, cand.r)
        copied = t.untyped_storage().nbytes() if t is not value.t else 0
        return copied + out.untyped_storage().nbytes()

    costs = [cost(c) for c in options]
    _timing.append(value.t.untyped_storage().nbytes() + max(costs))
    return options[costs.index(max(costs))]


def overhead(device: torch.device, timing: int) -> int:
    """Bytes a call needs beyond its traced tensors, ``timing`` the bytes its layout timing allocates."""
    if device.type != "cpu":  # cuda: max_memory_allocated counts tensors only
        return 0
    return PER_CALL + int(TIMING * timing)


def load_tracer() -> None:
    """Load PyTorch's fake-tensor and meta kernels (73-81 MB resident and 0.8 s, once per process)
    when a dense net is built, so that they are part of the process's state before its calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.empty(0)).new_empty((1, 1, 4, 4))
        torch.nn.functional.max_pool2d(torch.nn.functional.conv2d(x, x.new_empty((1, 1, 2, 2))), 2)


def available_memory(device: torch.device) -> int | None:
    """Bytes the process could still get: MemAvailable on Linux, free memory on a CUDA device."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_max_memory(fixed: int, device: torch.device) -> int:
    """The budget when none is given: what the call cannot avoid (``fixed``: padded image and
    output) plus a working set of 512 MB for the tiles, or half the memory still available if that
    is less; never less than a call's overhead plus 64 MB of tiles."""
    free = available_memory(device)
    working = DEFAULT_WORKING_SET if free is None else min(DEFAULT_WORKING_SET, (free - fixed) // 2)
    return fixed + max(working, overhead(device, 0) + 64 * MB)


def too_small(max_memory: int, minimum: int, fixed: int) -> ConfigError:
    """The one error for a budget below the smallest tile's predicted peak."""
    return ConfigError(f"max_memory={max_memory} bytes ({max_memory / MB:.0f} MB) is below the minimum for "
                       f"this image, {minimum} bytes ({-(-minimum // MB)} MB, of which {fixed / MB:.0f} MB are "
                       "the output and padded image, which tiles cannot split); raise max_memory or use a "
                       "smaller image")
