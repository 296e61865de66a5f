"""Convolution in the frequency domain (the lecture's "Can we apply CNN in frequency domain?").

By the convolution theorem a (circular) correlation is a pointwise product of spectra:
``corr(x, w) = irfft(rfft(x) * conj(rfft(w)))``. The cost of a direct convolution grows with the
kernel area (``O(H W k^2)`` per channel pair), the FFT's does not (``O(H W log(H W))`` per map, plus
one complex multiply-add per frequency and channel pair), so for large kernels the frequency domain
wins (Mathieu, Henaff, LeCun, "Fast training of convolutional networks through FFTs", ICLR 2014).
``benchmarks/layers.py`` measures the crossover.

:class:`FFTConv1d` / :class:`FFTConv2d` subclass ``nn.Conv1d`` / ``nn.Conv2d``: same arguments,
parameters, initialisation and state dict, and the same results (to rounding), including
``stride``, ``padding`` (ints, ``"same"``, ``"valid"``, any ``padding_mode``), ``dilation``,
``groups`` and ``bias``. How each is handled:

* padding: the input is zero-padded explicitly (other modes by ``nn.Conv``'s own ``F.pad``);
* dilation: the taps sit ``d`` apart in the kernel's DFT;
* no wrap-around: both are zero-extended to ``N >= padded input length`` per axis (the next
  2-3-5-smooth length, fast for pocketfft/cuFFT); every valid output ``o`` only reads
  ``x[o .. o + span - 1]``, which never wraps when ``N`` covers the input (no need for the
  ``L + k - 1`` of a full linear convolution);
* channels and groups: ``Y[b, o] = sum_c X[b, c] * conj(W[o, c])`` per frequency within each
  group, one batched complex matrix product; the kernel's (conjugate) spectrum is computed as a
  small matrix product with a DFT matrix per axis, since it has only ``k`` taps (see
  ``_kernel_spectrum``);
* stride: the full stride-1 correlation is computed and subsampled.

Nothing is cached between calls, so autograd sees one ordinary graph (rfftn/irfftn are
differentiable). float32 and float64 are computed natively; float16/bfloat16 inputs go through
float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.layers._common import IntOrTuple, as_tuple, check_float, check_input, effective_kernel


def next_fast_len(n: int) -> int:
    """Smallest ``m >= n`` whose only prime factors are 2, 3 and 5 (an efficient FFT length)."""
    best = 1 << max(0, (n - 1).bit_length())  # a power of two is always a candidate
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _resolve_padding(padding, kernel, dilation, stride, n: int, layer: str) -> list[tuple[int, int]]:
    """(left, right) zero padding per spatial axis, with PyTorch's rule for ``"same"``."""
    if padding == "valid":
        return [(0, 0)] * n
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ConfigError(f"{layer}: padding='same' needs stride 1 (as nn.Conv), got stride {stride}")
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    if isinstance(padding, str):
        raise ConfigError(f"{layer}: padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    return [(p, p) for p in as_tuple(padding, n, f"{layer} padding", minimum=0)]


def fft_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             stride: IntOrTuple = 1, padding: IntOrTuple | str = 0, dilation: IntOrTuple = 1,
             groups: int = 1) -> torch.Tensor:
    """``F.conv1d`` / ``F.conv2d`` (chosen by ``weight.dim()``) computed with real FFTs."""
    n = weight.dim() - 2
    layer = f"FFTConv{n}d"
    if n not in (1, 2):
        raise ConfigError(f"fft_conv weight must be (O, C/groups, k) or (O, C/groups, k_h, k_w), "
                          f"got shape {tuple(weight.shape)}")
    check_input(x, n, layer, weight.shape[1] * groups)
    check_float(x, layer)
    O, Cg, *kernel = weight.shape
    if O % groups:
        raise ConfigError(f"{layer}: {O} output channels are not divisible by groups={groups}")
    s = as_tuple(stride, n, f"{layer} stride")
    d = as_tuple(dilation, n, f"{layer} dilation")
    pads = _resolve_padding(padding, kernel, d, s, n, layer)
    span = [effective_kernel(k, di) for k, di in zip(kernel, d)]
    padded = [L + lo + hi for L, (lo, hi) in zip(x.shape[2:], pads)]
    if any(sp > P for sp, P in zip(span, padded)):
        raise ConfigError(f"{layer}: kernel {tuple(kernel)} (dilation {d}) is larger than the padded input "
                          f"{tuple(padded)}; use a smaller kernel or a larger input")
    out = [(P - sp) // si + 1 for P, sp, si in zip(padded, span, s)]

    in_dtype = x.dtype
    dtype = in_dtype if in_dtype in (torch.float32, torch.float64) else torch.float32  # no half FFTs
    x = F.pad(x.to(dtype), [p for lo_hi in reversed(pads) for p in lo_hi])  # (B, C, *padded)
    sizes = [next_fast_len(P) for P in padded]
    dims = tuple(range(-n, 0))
    B, G, Og = x.shape[0], groups, O // groups
    X = torch.fft.rfftn(x, s=sizes, dim=dims)  # (B, C, *freq)
    freq = X.shape[2:]
    # Channel mixing: one (B x C/g) @ (C/g x O/g) complex product per frequency and group, as a
    # single bmm over contiguous (G*F, ...) batches (a permuted view would make bmm copy per matrix).
    Xb = X.reshape(B, G, Cg, -1).permute(1, 3, 0, 2).contiguous().view(-1, B, Cg)  # (G*F, B, C/g)
    Wb = _kernel_spectrum(weight.to(dtype), sizes, d, groups).view(-1, Cg, Og)  # (G*F, C/g, O/g)
    Y = _ContiguousBmm.apply(Xb, Wb).view(G, -1, B, Og)  # (G, F, B, O/g)
    Y = Y.permute(2, 0, 3, 1).reshape(B, O, *freq)  # (B, O, *freq)
    y = torch.fft.irfftn(Y, s=sizes, dim=dims)  # (B, O, *sizes): y[o] = sum_m w[m] x[o + m]
    y = y[(..., *(slice(0, (o - 1) * si + 1, si) for o, si in zip(out, s)))]  # valid part, strided
    if bias is not None:
        y = y + bias.to(dtype).view(O, *([1] * n))
    return y.to(in_dtype)


class _ContiguousBmm(torch.autograd.Function):
    """``torch.bmm`` whose backward hands bmm contiguous operands.

    Autograd's own bmm backward multiplies by conjugate-transposed *views*; for complex tensors on
    CPU that sends bmm down a path that copies every one of the F small matrices separately (tens of
    thousands of copies here, most of FFTConv's backward time). Same formulas
    (``grad_a = grad @ b^H``, ``grad_b = a^H @ grad``), materialised once.
    """

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.bmm(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.bmm(grad, b.transpose(1, 2).conj().contiguous())
        if ctx.needs_input_grad[1]:
            grad_b = torch.bmm(a.transpose(1, 2).conj().contiguous(), grad)
        return grad_a, grad_b


def _conj_dft_matrix(size: int, taps: int, dilation: int, half: bool, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """``E[u, m] = exp(+2 pi i u (m d) / size)`` for u < size (or size // 2 + 1 if ``half``): the
    conjugate DFT of a kernel tap at position ``m * d``. Conjugate, because a correlation is the
    product with the conjugate spectrum."""
    rows = size // 2 + 1 if half else size
    phase = (torch.arange(rows)[:, None] * (torch.arange(taps)[None, :] * dilation)) % size  # exact ints
    angle = phase.to(torch.float64) * (2 * math.pi / size)
    return torch.complex(torch.cos(angle), torch.sin(angle)).to(device=device, dtype=dtype.to_complex())


def _kernel_spectrum(weight: torch.Tensor, sizes, dilation, groups: int) -> torch.Tensor:
    """Conjugate spectrum of (O, C/g, *k) kernels on the ``sizes`` grid, laid out (G, *freq, C/g, O/g).

    A kernel has k << N taps per axis, so its DFT is a small matrix product per axis with a
    (N x k) DFT matrix, which also yields the frequency-major layout that the channel mixing needs
    (an FFT of the zero-padded kernel costs as much as a full map's and comes out channel-major).
    Dilation only changes the taps' positions ``m * d`` in the DFT matrix.
    """
    n = weight.dim() - 2
    O, Cg, *k = weight.shape
    t = weight.to(weight.dtype.to_complex()).view(groups, O // groups, Cg, *k)
    t = t.permute(*range(3, 3 + n), 0, 2, 1)  # (*k, G, C/g, O/g)
    for axis in reversed(range(n)):
        E = _conj_dft_matrix(sizes[axis], k[axis], dilation[axis], axis == n - 1, weight.dtype, weight.device)
        # contract this axis's taps (at position n - 1, after the frequency axes already made)
        t = torch.tensordot(E, t, dims=([1], [n - 1]))  # (freq_axis, ...)
    return t.permute(n, *range(n), n + 1, n + 2).contiguous()  # (G, *freq, C/g, O/g)


def _check_conv_args(layer: str, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                     n: int) -> None:
    """Turn the argument errors ``nn.Conv`` would raise as ValueError into one-line ConfigErrors."""
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{layer} {name} must be a positive int, got {value!r}")
    if in_channels % groups or out_channels % groups:
        raise ConfigError(f"{layer}: in_channels={in_channels} and out_channels={out_channels} must both be "
                          f"divisible by groups={groups}")
    kernel = as_tuple(kernel_size, n, f"{layer} kernel_size")
    s = as_tuple(stride, n, f"{layer} stride")
    d = as_tuple(dilation, n, f"{layer} dilation")
    _resolve_padding(padding, kernel, d, s, n, layer)


class FFTConv1d(nn.Conv1d):
    """``nn.Conv1d`` computed in the frequency domain (same arguments, parameters and results)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 padding: IntOrTuple | str = 0, dilation: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None):
        _check_conv_args("FFTConv1d", in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, 1)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv1d: pad with the mode, then convolve unpadded
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return fft_conv(input, weight, bias, self.stride, padding, self.dilation, self.groups)


class FFTConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed in the frequency domain (same arguments, parameters and results)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 padding: IntOrTuple | str = 0, dilation: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None):
        _check_conv_args("FFTConv2d", in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, 2)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d: pad with the mode, then convolve unpadded
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return fft_conv(input, weight, bias, self.stride, padding, self.dilation, self.groups)

