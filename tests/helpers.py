"""Helpers shared by several test files (pytest puts tests/ on sys.path)."""

import torch


def values_and_grads(fn, x, seed=0):
    """``fn(x)`` and the gradient of a seeded random projection of it with respect to ``x``."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (grad,) = torch.autograd.grad(y, x, g)
    return y.detach(), grad
