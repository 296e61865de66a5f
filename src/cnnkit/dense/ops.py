"""Dense kernels and the two memory layouts of the same computation.

After Algorithm 1 of the lecture (Li, Zhao, Wang, arXiv:1412.4526) a layer runs with stride 1 and
its kernel dilated by ``D`` (the "d-regularly sparse" kernel). The same numbers can be computed in
two layouts:

- dilated: one tensor ``(N, C, *L)``, kernels with dilation ``D`` (Li et al.);
- space-to-batch ("multipool", Bailer et al. BMVC 2017; FCN's shift-and-stitch): the map is split
  into ``prod(D)`` phase sub-images ``X_a[m] = X[a + D m]`` stacked on the batch axis, where an
  ordinary stride-1, dilation-1 kernel gives ``Y_a[m] = Y[a + D m]``.

A :class:`Value` carries its tensor together with its layout: a stack of split factors (``levels``)
so that a later layer can split further (``D`` grows along the network) without interleaving back.
Garbage (zero padding for divisibility, outputs of windows that run past the end) only ever sits at
the end of each axis in dense order, so it is cropped once at the output.

A layer with dense dilation ``D`` on an input split by ``F`` can run with residual dilation ``D / F``
when ``F`` divides ``D``. :class:`LayoutChooser` times the candidate layouts once per layer
configuration on the running machine and caches the faster one.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Factors = tuple[int, ...]  # one split factor per spatial axis
Levels = tuple[Factors, ...]  # nested splits, outermost first

LAYOUTS = ("auto", "dilated", "space_to_batch")


def prod(xs: Sequence[int]) -> int:
    return math.prod(xs)


def preferred_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for 2D float32/half maps: oneDNN's convolutions and dilated max pooling are
    several times faster in NHWC on CPU (measured, see benchmarks/dense.py); float64 has no oneDNN
    path and stays NCHW."""
    if t.dim() == 4 and t.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.channels_last
    return torch.contiguous_format


def _empty(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if len(shape) == 4 and preferred_format(like) == torch.channels_last else None
    if fmt is None:
        return like.new_empty(shape)
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def split(t: torch.Tensor, f: Factors) -> torch.Tensor:
    """Space-to-batch: ``(B, C, *L) -> (prod(f) * B, C, *ceil(L / f))``; phase-major batch order.

    Axes whose length is not a multiple of the factor get zeros at the end of the short phases.
    """
    if all(x == 1 for x in f):
        return t
    b, c, *ls = t.shape
    ms = [-(-n // k) for n, k in zip(ls, f)]
    out = _empty((prod(f) * b, c, *ms), t)
    view = out.view(*f, b, c, *ms)  # (f1, f2, B, C, m1, m2)
    if all(n == m * k for n, m, k in zip(ls, ms, f)):
        # (B, C, m1, f1, m2, f2) -> (f1, f2, B, C, m1, m2)
        src = t.reshape(b, c, *itertools.chain.from_iterable((m, k) for m, k in zip(ms, f)))
        nd = len(f)
        perm = [2 + 2 * i + 1 for i in range(nd)] + [0, 1] + [2 + 2 * i for i in range(nd)]
        view.copy_(src.permute(perm))
        return out
    for phase in itertools.product(*(range(k) for k in f)):
        sl = (slice(None), slice(None)) + tuple(slice(a, None, k) for a, k in zip(phase, f))
        part = t[sl]
        dst = view[phase]  # (B, C, *m)
        dst[(slice(None), slice(None)) + tuple(slice(0, n) for n in part.shape[2:])].copy_(part)
        for axis, n in enumerate(part.shape[2:]):
            if n < ms[axis]:  # the short phase's tail: finite filler, cropped at the output
                idx = [slice(None)] * (2 + len(f))
                idx[2 + axis] = slice(n, None)
                dst[tuple(idx)].zero_()
    return out


def merge(t: torch.Tensor, f: Factors) -> torch.Tensor:
    """Inverse of :func:`split` without cropping: ``(prod(f) * B, C, *m) -> (B, C, *(m * f))``."""
    if all(x == 1 for x in f):
        return t
    fb, c, *ms = t.shape
    b = fb // prod(f)
    nd = len(f)
    out = _empty((b, c, *(m * k for m, k in zip(ms, f))), t)
    view = out.view(b, c, *itertools.chain.from_iterable((m, k) for m, k in zip(ms, f)))
    perm = [2 + 2 * i + 1 for i in range(nd)] + [0, 1] + [2 + 2 * i for i in range(nd)]
    view.permute(perm).copy_(t.view(*f, b, c, *ms))
    return out


@dataclass
class Value:
    """A dense map in some layout: ``t`` is ``(n * prod(all factors), C, *sub_sizes)``."""

    t: torch.Tensor
    levels: Levels = ()

    @property
    def factor(self) -> Factors:
        return _factor(self.levels, self.t.dim() - 2)

    @property
    def batch(self) -> int:
        return self.t.shape[0] // prod(self.factor)

    def to(self, levels: Levels) -> Value:
        """Re-layout: interleave the levels not shared with ``levels``, then split the new ones."""
        common = 0
        while common < min(len(levels), len(self.levels)) and levels[common] == self.levels[common]:
            common += 1
        t = self.t
        for lv in reversed(self.levels[common:]):
            t = merge(t, lv)
        for lv in levels[common:]:
            t = split(t, lv)
        return Value(t, tuple(levels))

    def dense(self) -> torch.Tensor:
        return self.to(()).t


def levels_for(current: Levels, target: Factors) -> Levels:
    """Levels reaching total factor ``target``, reusing ``current`` when its factor divides it."""
    if all(x == 1 for x in target):
        return ()
    f = _factor(current, len(target))
    if all(t % c == 0 for t, c in zip(target, f)):
        rest = tuple(t // c for t, c in zip(target, f))
        return current if all(r == 1 for r in rest) else current + (rest,)
    return (tuple(target),)


def _factor(levels: Levels, nd: int) -> Factors:
    out = [1] * nd
    for lv in levels:
        out = [a * b for a, b in zip(out, lv)]
    return tuple(out)


def pixel_chunked(fn: Callable[[list[torch.Tensor]], torch.Tensor], tensors: Sequence[torch.Tensor]
                  ) -> torch.Tensor:
    """Apply a per-pixel function to maps (B, C_i, *S) in fixed-size blocks of pixels.

    PyTorch's vectorised CPU loops finish a run with scalar code, and some functions (sigmoid,
    GELU, softplus, softmax) round differently there; which pixels land in the tail depends on the
    map size. Blocks of (rows, C, 1, ...) with ``rows`` a multiple of 16 and below the parallel grain
    size run entirely in the vector path on one thread: the same bits for a pixel in any tile.
    """
    b, _, *s = tensors[0].shape
    nd = len(s)
    p = b * prod(s)
    widest = max(t.shape[1] for t in tensors)
    rows = max(16, (2**14 // max(widest, 1)) // 16 * 16)
    total = -(-p // rows) * rows
    flat = []
    for t in tensors:
        f = t.movedim(1, -1).reshape(p, t.shape[1])  # (P, C): pixel-major
        if total > p:
            f = torch.cat([f, f.new_zeros(total - p, t.shape[1])])
        flat.append(f)
    ones = (1,) * nd
    outs = [fn([f[i:i + rows].view(rows, f.shape[1], *ones) for f in flat]) for i in range(0, total, rows)]
    out = torch.cat(outs)[:p]  # (P, C_out, 1, ...)
    return out.reshape(b, *s, out.shape[1]).movedim(-1, 1).contiguous()


def crop_to_common(values: Sequence[Value]) -> list[torch.Tensor]:
    """Same layout assumed; cut every sub-image to the shortest (branches of different extent)."""
    sizes = [min(v.t.shape[2 + i] for v in values) for i in range(values[0].t.dim() - 2)]
    return [v.t[(...,) + tuple(slice(0, s) for s in sizes)] for v in values]


# --------------------------------------------------------------------------- spatial kernels


def _conv(nd: int) -> Callable:
    return (F.conv1d, F.conv2d, F.conv3d)[nd - 1]


def _max_pool(nd: int) -> Callable:
    return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]


def _avg_pool(nd: int) -> Callable:
    return (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]


class SpatialKernel:
    """A stride-1 sliding-window op; ``run(t, r)`` applies it with taps ``r`` apart, for any batch.

    Weights are those of the original module (fetched at call time), so the dense network shares
    (and trains) the patch classifier's parameters.
    """

    kernel: Factors

    def run(self, t: torch.Tensor, r: Factors) -> torch.Tensor:
        raise NotImplementedError


def exact_conv(t: torch.Tensor) -> bool:
    """float64 runs bit-reproducible convolutions: the same pixel gives the same bits whatever the
    image or tile size (BLAS blocking and cuDNN's algorithm choice depend on the size)."""
    return t.dtype == torch.float64


def exact_pointwise(t: torch.Tensor) -> bool:
    """float64 on CPU runs elementwise functions in fixed pixel blocks (see ``pixel_chunked``);
    on CUDA every element runs the same code already."""
    return t.dtype == torch.float64 and t.device.type == "cpu"


def conv_exact(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, r: Factors,
               groups: int) -> torch.Tensor:
    """Convolution as a fixed sequence of plain multiplies and adds (one IEEE rounding each), so
    every output element is computed identically whatever the map size. Differentiable."""
    nd = t.dim() - 2
    k = w.shape[2:]
    size = [n - d * (kk - 1) for n, d, kk in zip(t.shape[2:], r, k)]
    og, cg = w.shape[0] // groups, w.shape[1]
    ones = (1,) * nd
    grad = torch.is_grad_enabled() and (t.requires_grad or w.requires_grad)
    outs = []
    for g in range(groups):
        acc = buf = None
        for ci in range(cg):
            x = t[:, g * cg + ci: g * cg + ci + 1]  # (N, 1, *L)
            for tap in itertools.product(*(range(kk) for kk in k)):
                window = x[(..., *(slice(j * d, j * d + n) for j, d, n in zip(tap, r, size)))]
                wv = w[(slice(g * og, (g + 1) * og), ci, *tap)].view(1, og, *ones)
                if grad or acc is None:
                    term = window * wv
                    acc = term if acc is None else acc + term
                else:  # inference: reuse one buffer, add in place (same roundings)
                    buf = torch.mul(window, wv, out=buf)
                    acc.add_(buf)
        if b is not None:
            acc = acc + b[g * og:(g + 1) * og].view(1, og, *ones)
        outs.append(acc)
    return outs[0] if groups == 1 else torch.cat(outs, 1)


class ConvKernel(SpatialKernel):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: Factors, groups: int):
        self.weight, self.bias, self.kernel, self.groups = weight, bias, tuple(kernel), groups

    def run(self, t, r):
        if exact_conv(t):
            return conv_exact(t, self.weight, self.bias, r, self.groups)
        return _conv(t.dim() - 2)(t, self.weight, self.bias, 1, 0, r, self.groups)


class MaxPoolKernel(SpatialKernel):
    def __init__(self, kernel: Factors):
        self.kernel = tuple(kernel)

    def run(self, t, r):
        return _max_pool(t.dim() - 2)(t, self.kernel, 1, 0, r)


class AvgPoolKernel(SpatialKernel):
    """Average (``scale = 1 / window``) or sum pooling. PyTorch has no dilated average pooling
    (pytorch/pytorch#14907): with dilation it runs as a depthwise convolution with a constant
    kernel, measured faster than summing shifted slices (channels_last, oneDNN)."""

    def __init__(self, kernel: Factors, scale: float):
        self.kernel, self.scale = tuple(kernel), scale

    def run(self, t, r):
        nd = t.dim() - 2
        if all(x == 1 for x in r) and abs(self.scale * prod(self.kernel) - 1) < 1e-12:
            return _avg_pool(nd)(t, self.kernel, 1)
        c = int(t.shape[1])  # a constant, also when traced for ONNX (whose Conv needs a known kernel shape)
        w = torch.full((c, 1, *self.kernel), self.scale, dtype=t.dtype, device=t.device)
        if exact_conv(t):
            return conv_exact(t, w, None, r, c)
        return _conv(nd)(t, w, None, 1, 0, r, c)


# --------------------------------------------------------------------------- layout choice


@dataclass(frozen=True)
class Candidate:
    name: str  # "dilated" | "keep" | "space_to_batch"
    levels: Levels
    r: Factors  # residual dilation on the sub-images

    def describe(self) -> str:
        f = _factor(self.levels, len(self.r))
        dil = "x".join(map(str, self.r))
        if not self.levels:
            return f"dilated {dil}" if any(v > 1 for v in self.r) else "direct"
        text = f"space_to_batch {'x'.join(map(str, f))}"
        return text + (f" + dilation {dil}" if any(v > 1 for v in self.r) else "")


def candidates(current: Levels, dilation: Factors, kernel: Factors, mode: str) -> list[Candidate]:
    """Layouts a window op may run in: the input's own split ``F`` works when ``F`` divides the
    dense dilation (residual dilation ``D / F``); a 1 x 1 kernel works in any layout."""
    nd = len(dilation)
    ones = (1,) * nd
    if all(k == 1 for k in kernel):
        return [Candidate("keep", current, ones)]
    dilated = Candidate("dilated", (), dilation)
    s2b = Candidate("space_to_batch", levels_for(current, dilation), ones)
    if mode == "dilated" or dilation == ones:
        return [dilated]
    if mode == "space_to_batch":
        return [s2b]
    out = [dilated, s2b]
    f = _factor(current, nd)
    if current and f != dilation and all(d % x == 0 for d, x in zip(dilation, f)):
        out.append(Candidate("keep", current, tuple(d // x for d, x in zip(dilation, f))))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LayoutChooser:
    """Times each candidate layout for a layer once and remembers the fastest.

    The cache key leaves out the spatial size on purpose: every tile and every image then runs the
    same layouts, so tiled and untiled results agree bit for bit. ``pinned`` (layer -> layout name,
    as :meth:`chosen` returns) fixes choices made earlier: a resumed training run computes with the
    layouts it started with, so it repeats an uninterrupted run bit for bit.
    """

    def __init__(self, mode: str = "auto", pinned: dict[str, str] | None = None):
        if mode not in LAYOUTS:
            raise ValueError(f"mode must be one of {LAYOUTS}, got {mode!r}")
        self.mode = mode
        self.cache: dict[tuple, Candidate] = {}
        self.pinned = dict(pinned or {})

    def chosen(self) -> dict[str, str]:
        """Layer -> the layout it runs with (the measured or pinned choices so far)."""
        return {**self.pinned, **{key[0]: cand.name for key, cand in self.cache.items()}}

    def choose(self, key: str, kernel: SpatialKernel, value: Value, dilation: Factors) -> Candidate:
        options = candidates(value.levels, dilation, kernel.kernel, self.mode)
        if len(options) == 1:
            return options[0]
        named = [c for c in options if c.name == self.pinned.get(key)]
        if named:
            return named[0]
        t = value.t
        ck = (key, value.levels, t.shape[1], t.dtype, t.device.type, torch.is_autocast_enabled(t.device.type))
        if ck not in self.cache:
            ext = tuple(k * d - d for k, d in zip(kernel.kernel, dilation))
            self.cache[ck] = self._measure(kernel, _proxy(value, ext), options)
            log.debug("layer %s: %s layout", key, self.cache[ck].name)
        return self.cache[ck]

    @staticmethod
    def _measure(kernel: SpatialKernel, value: Value, options: list[Candidate]) -> Candidate:
        best, best_time = options[0], math.inf
        with torch.no_grad():
            for cand in options:
                times = []
                for _ in range(5):
                    _sync(value.t.device)
                    start = time.perf_counter()
                    kernel.run(value.to(cand.levels).t, cand.r)
                    _sync(value.t.device)
                    times.append(time.perf_counter() - start)
                    if sum(times) > 0.05 and len(times) >= 2:
                        break
                # the first run pays one-off costs (oneDNN primitive creation): use the later ones
                elapsed = min(times[1:]) if len(times) > 1 else times[0]
                if elapsed < best_time:
                    best, best_time = cand, elapsed
        return best


def _proxy(value: Value, ext: Factors, side: int = 256) -> Value:
    """The first image of ``value`` cut to about ``side`` output positions per axis: timing a layout
    on a 1080 x 720 map would cost seconds, and the ranking hardly depends on the size."""
    t, f = value.t, value.factor
    nph = prod(f)
    t = t.view(nph, value.batch, *t.shape[1:])[:, :1].reshape(nph, *t.shape[1:])  # (prod(f), C, *m)
    sizes = [min(m, -(-(e + side) // k)) for m, e, k in zip(t.shape[2:], ext, f)]
    t = t[(...,) + tuple(slice(0, s) for s in sizes)]
    return Value(t.contiguous(memory_format=preferred_format(t)), value.levels)
