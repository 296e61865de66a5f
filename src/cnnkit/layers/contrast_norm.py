"""Local contrast normalisation (LCN): the lecture's ``h <- (h - m_N) / sigma_N``.

The neighbourhood ``N(x, y, k)`` spans space and feature maps. We follow the definition of Jarrett,
Kavukcuoglu, Ranzato, LeCun, "What is the best multi-stage architecture for object recognition?",
ICCV 2009, Sec. 2 ("local contrast normalisation layer N"), with ``w`` a Gaussian window normalised
so that ``sum_{i,p,q} w_pq = 1`` over the C feature maps ``i`` and the spatial offsets ``(p, q)``:

    subtractive:  v[i,j,k] = x[i,j,k] - sum_{i,p,q} w_pq x[i, j+p, k+q]                 (m_N)
    divisive:     y[i,j,k] = v[i,j,k] / max(c, sigma[j,k]),
                  sigma[j,k] = ( sum_{i,p,q} w_pq v[i, j+p, k+q]^2 )^(1/2)            (sigma_N)

so ``sigma_N`` is the Gaussian-weighted spread of the *already centred* map around each position
(two passes, numerically stable) and ``c = mean_{j,k}(sigma[j,k])`` per image (``c="mean"``, as
Jarrett et al.), or a fixed number. With ``c="mean"`` every output depends on the whole image;
a fixed ``c`` keeps the layer local (what exact pixelwise / dense evaluation needs).
``max(c, sigma)`` keeps flat regions from being amplified: the division only ever shrinks contrast
that is above the image's typical level.

Options beyond the paper, each documented where it is used:

* ``across_channels=False``: every feature map is normalised on its own (``N`` spatial only).
* ``padding="same"``: the map is zero-padded and, as in Jarrett et al.'s code, every local sum is
  divided by the weight of the window that falls inside the image, so that border means are
  means of real pixels. ``padding="valid"``: no padding; each of the two passes shrinks the map
  by ``span - 1`` per side pair, where ``span = (kernel - 1) * dilation + 1``, so the output is
  ``2 * (span - 1)`` smaller than the input and contains only positions whose whole two-pass
  neighbourhood is inside the input. For an even span the centre is the window's lower middle
  (offset ``(span - 1) // 2``, the same as the left padding of "same").
* ``dilation``: the Gaussian's taps are ``dilation`` pixels apart (the d-regularly sparse window
  that the dense converter needs after strided layers).
* ``eps``: a floor on the divisor, so a constant input gives 0 rather than 0/0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.layers._common import IntOrTuple, as_tuple, check_float, check_input, effective_kernel

PADDINGS = ("same", "valid")


def gaussian_window(kernel_size: IntOrTuple, sigma: float | None = None, spatial_dims: int = 2,
                    dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """A separable Gaussian window of shape ``kernel_size`` that sums to 1.

    ``sigma`` (pixels, same in every dimension) defaults to ``kernel_size / 4``: 2.25 for Jarrett's 9x9.
    """
    size = as_tuple(kernel_size, spatial_dims, "LCN kernel_size")
    if sigma is not None and not sigma > 0:
        raise ConfigError(f"LCN sigma must be a positive number of pixels, got {sigma!r}")
    window = torch.ones((), dtype=torch.float64)
    for k in size:
        s = k / 4 if sigma is None else sigma
        t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
        window = window[..., None] * torch.exp(-t**2 / (2 * s * s))  # outer product, one axis at a time
    return (window / window.sum()).to(dtype=dtype, device=device)


def _safe_sqrt(t: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (sub)gradient at 0, so a flat region does not turn the gradient into NaN."""
    positive = t > 0
    root = torch.sqrt(torch.where(positive, t, torch.ones_like(t)))  # never evaluates sqrt'(0)
    return torch.where(positive, root, torch.zeros_like(t))


def local_contrast_norm(x: torch.Tensor, kernel: torch.Tensor, *, across_channels: bool = True,
                        c: float | str = "mean", padding: str = "same", dilation: IntOrTuple = 1,
                        eps: float = 1e-6) -> torch.Tensor:
    """Jarrett et al.'s LCN of a (B, C, L) or (B, C, H, W) map with window ``kernel`` ((k,) or (k_h, k_w)).

    ``kernel`` must be non-negative; it is normalised to sum to 1 here. See the module docstring.
    """
    n = kernel.dim() if isinstance(kernel, torch.Tensor) else 0
    if n not in (1, 2):
        raise ConfigError("LCN kernel must be a 1-d (k,) or 2-d (k_h, k_w) tensor of window weights")
    check_input(x, n, f"LocalContrastNorm{n}d")
    check_float(x, f"LocalContrastNorm{n}d")
    if padding not in PADDINGS:
        raise ConfigError(f"LCN padding must be one of {PADDINGS}, got {padding!r}")
    if not (c == "mean" or (isinstance(c, (int, float)) and c >= 0)):
        raise ConfigError(f"LCN c must be 'mean' (Jarrett et al.) or a number >= 0, got {c!r}")
    if bool((kernel < 0).any()) or not float(kernel.sum()) > 0:
        raise ConfigError("LCN kernel weights must be non-negative with a positive sum")
    d = as_tuple(dilation, n, "LCN dilation")
    span = [effective_kernel(k, di) for k, di in zip(kernel.shape, d)]
    passes = 1 if padding == "same" else 2
    if any(L < passes * (s - 1) + 1 for L, s in zip(x.shape[2:], span)):
        raise ConfigError(f"LCN window {tuple(kernel.shape)} (dilation {d}) needs an input of at least "
                          f"{[passes * (s - 1) + 1 for s in span]} with padding={padding!r}, "
                          f"got {tuple(x.shape[2:])}")
    if n == 1:  # a length-L map is a 1 x L image
        y = local_contrast_norm(x.unsqueeze(2), kernel.unsqueeze(0), across_channels=across_channels, c=c,
                                padding=padding, dilation=(1, d[0]), eps=eps)
        return y.squeeze(2)

    maps = 1 if across_channels else x.shape[1]
    w = (kernel / kernel.sum()).to(x).expand(maps, 1, *kernel.shape)  # depthwise (maps, 1, k_h, k_w)
    left = [(s - 1) // 2 for s in span]
    pad = (left[1], span[1] - 1 - left[1], left[0], span[0] - 1 - left[0])

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        """Window average of t (B, C, H, W) over the neighbourhood N: across maps first, then space."""
        t = t.mean(dim=1, keepdim=True) if across_channels else t  # (B, maps, H, W)
        if padding == "valid":
            return F.conv2d(t, w, dilation=d, groups=maps)  # (B, maps, H - span + 1, W - span + 1)
        # "same": zero padding, divided by the window weight inside the image (1 away from borders).
        inside = F.conv2d(F.pad(t.new_ones(1, 1, *t.shape[2:]), pad), w[:1], dilation=d)  # (1, 1, H, W)
        return F.conv2d(F.pad(t, pad), w, dilation=d, groups=maps) / inside

    def centre(t: torch.Tensor, shape) -> torch.Tensor:
        """The part of t aligned with a valid window result of the given spatial shape."""
        return t if padding == "same" else t[..., left[0]: left[0] + shape[0], left[1]: left[1] + shape[1]]

    m = local_mean(x)  # (B, maps, H', W')
    v = centre(x, m.shape[2:]) - m  # (B, C, H', W'): subtractive normalisation
    var = local_mean(v * v)  # (B, maps, H'', W'')
    if c == "mean":
        sigma = _safe_sqrt(var)
        divisor = torch.maximum(sigma, sigma.mean(dim=(2, 3), keepdim=True))  # Jarrett: c = mean(sigma)
    else:
        # max(c, sigma) = sqrt(max(c^2, sigma^2)): no sqrt at 0 when c > 0
        divisor = _safe_sqrt(var.clamp_min(float(c) ** 2))
    return centre(v, var.shape[2:]) / divisor.clamp_min(eps)


class _LocalContrastNormNd(nn.Module):
    spatial_dims = 2

    def __init__(self, kernel_size: IntOrTuple = 9, sigma: float | None = None, *,
                 across_channels: bool = True, c: float | str = "mean", padding: str = "same",
                 dilation: IntOrTuple = 1, eps: float = 1e-6):
        super().__init__()
        n = self.spatial_dims
        if padding not in PADDINGS:
            raise ConfigError(f"LCN padding must be one of {PADDINGS}, got {padding!r}")
        if not (c == "mean" or (isinstance(c, (int, float)) and c >= 0)):
            raise ConfigError(f"LCN c must be 'mean' (Jarrett et al.) or a number >= 0, got {c!r}")
        self.kernel_size = as_tuple(kernel_size, n, "LCN kernel_size")
        self.dilation = as_tuple(dilation, n, "LCN dilation")
        self.sigma, self.across_channels, self.c = sigma, across_channels, c
        self.padding, self.eps = padding, eps
        gaussian_window(self.kernel_size, sigma, n)  # validates sigma now rather than at the first call

    def window(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """The normalised Gaussian window (built per call in the input's dtype: no stored state)."""
        return gaussian_window(self.kernel_size, self.sigma, self.spatial_dims, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = self.window(x.dtype if x.is_floating_point() else torch.float32, x.device)
        return local_contrast_norm(x, window, across_channels=self.across_channels, c=self.c,
                                   padding=self.padding, dilation=self.dilation, eps=self.eps)

    def shrink(self) -> tuple[int, ...]:
        """How much smaller the output is than the input, per spatial axis (0 for "same")."""
        if self.padding == "same":
            return (0,) * self.spatial_dims
        return tuple(2 * (effective_kernel(k, d) - 1) for k, d in zip(self.kernel_size, self.dilation))

    def extra_repr(self) -> str:
        sigma = self.sigma if self.sigma is not None else tuple(k / 4 for k in self.kernel_size)
        return (f"kernel_size={self.kernel_size}, sigma={sigma}, across_channels={self.across_channels}, "
                f"c={self.c!r}, padding={self.padding!r}, dilation={self.dilation}")


class LocalContrastNorm1d(_LocalContrastNormNd):
    """Jarrett et al.'s local contrast normalisation of a (B, C, L) map (see the module docstring)."""

    spatial_dims = 1


class LocalContrastNorm2d(_LocalContrastNormNd):
    """Jarrett et al.'s local contrast normalisation of a (B, C, H, W) map (see the module docstring)."""

    spatial_dims = 2

