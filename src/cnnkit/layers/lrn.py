"""Local response normalisation, in both conventions found in the literature.

    b_c = a_c / (k + alpha' * sum_{c' in window(c)} a_{c'}^2) ** beta,   window = n channels centred on c

- ``convention="paper"`` (Krizhevsky et al. 2012): alpha' = alpha, with n=5, alpha=1e-4, beta=0.75, k=2.
- ``convention="caffe"`` (Caffe, PyTorch's ``nn.LocalResponseNorm``): alpha' = alpha / n.

The same numbers therefore give a normalisation n times weaker under the Caffe convention.
Channels beyond the edges count as zeros (the window is clipped), as in both references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ConfigError

CONVENTIONS = ("paper", "caffe")


class LocalResponseNorm(nn.Module):
    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                 convention: str = "paper"):
        super().__init__()
        if convention not in CONVENTIONS:
            raise ConfigError(f"LRN convention must be one of {CONVENTIONS}, got {convention!r}")
        if size < 1:
            raise ConfigError(f"LRN size must be at least 1, got {size}")
        self.size, self.alpha, self.beta, self.k, self.convention = size, alpha, beta, k, convention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.local_response_norm divides alpha by size (Caffe); undo that for the paper's convention.
        alpha = self.alpha * self.size if self.convention == "paper" else self.alpha
        return F.local_response_norm(x, self.size, alpha=alpha, beta=self.beta, k=self.k)

    def extra_repr(self) -> str:
        return (f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, "
                f"convention={self.convention!r}")
