"""The lecture's layers (see each module's docstring for the formula and its source)."""

from cnnkit.layers.lrn import LocalResponseNorm

__all__ = ["LocalResponseNorm"]
