"""Local response normalisation (LRN), in both conventions found in the literature.

    b_c = a_c / (k + alpha' * sum_{c' in window(c)} a_{c'}^2) ** beta

``window(c)`` is ``n = size`` channels centred on ``c``, clipped at the first and last channel
(channels beyond the edges count as zeros), at every spatial position.

==========================  ==========================================  =============================
                            ``convention="paper"``                      ``convention="caffe"``
==========================  ==========================================  =============================
source                      Krizhevsky, Sutskever, Hinton, NIPS 2012,   Caffe ``LRN`` layer; PyTorch
                            Sec. 3.3 (AlexNet)                          ``nn.LocalResponseNorm``
alpha'                      ``alpha``                                   ``alpha / n``
published numbers           n=5, alpha=1e-4, beta=0.75, k=2             n=5, alpha=1e-4, beta=0.75,
                                                                        k=1 (CaffeNet: k=1)
==========================  ==========================================  =============================

The same numbers therefore give a normalisation ``n`` times weaker under the Caffe convention, and
``LocalResponseNorm(n, alpha, convention="paper")`` equals ``LocalResponseNorm(n, alpha * n,
convention="caffe")``. The paper writes the window as ``max(0, c - n/2) .. min(N - 1, c + n/2)``:
for odd ``n`` that is ``n`` channels, as here. For even ``n`` the window here (as PyTorch's) holds
``n`` channels, ``n/2`` before ``c`` and ``n/2 - 1`` after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ConfigError

CONVENTIONS = ("paper", "caffe")


class LocalResponseNorm(nn.Module):
    """Normalise each channel by the energy of its ``size`` neighbouring channels (see module docstring).

    Input: (B, C, *spatial) with any number of spatial axes (including none).
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                 convention: str = "paper"):
        super().__init__()
        if convention not in CONVENTIONS:
            raise ConfigError(f"LRN convention must be one of {CONVENTIONS}, got {convention!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"LRN size must be a positive int, got {size!r}")
        if not alpha >= 0 or not beta >= 0:
            raise ConfigError(f"LRN alpha and beta must be >= 0, got alpha={alpha!r}, beta={beta!r}")
        if not k > 0:
            raise ConfigError(f"LRN k must be > 0 (it keeps the denominator positive), got {k!r}")
        self.size, self.alpha, self.beta, self.k, self.convention = size, alpha, beta, k, convention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"LocalResponseNorm expects (B, C, ...) input, got {shape}")
        if x.dim() == 2:  # (B, C): a map with no spatial axes
            return self(x[..., None]).squeeze(-1)
        # F.local_response_norm divides alpha by size (Caffe); undo that for the paper's convention.
        alpha = self.alpha * self.size if self.convention == "paper" else self.alpha
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            # PyTorch's LRN pools with avg_pool3d, which has no half-precision CPU kernel: compute in float32.
            return F.local_response_norm(x.float(), self.size, alpha=alpha, beta=self.beta, k=self.k).to(x.dtype)
        return F.local_response_norm(x, self.size, alpha=alpha, beta=self.beta, k=self.k)

    def extra_repr(self) -> str:
        return (f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, "
                f"convention={self.convention!r}")
