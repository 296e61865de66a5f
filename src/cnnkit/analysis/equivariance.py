"""Measure how a module commutes with translations, rotations and scalings.

The lecture: "Parameter sharing causes the layer to have *equivariance* to translation. A function
f(x) is equivariant to a function g if f(g(x)) = g(f(x)). Is convolution equivariant to changes in
the scale or rotation?"

    equivariance_error(f, g, x) = ||f(g x) - g f(x)|| / ||f(x)||
    invariance_error(f, g, x)   = ||f(g x) -   f(x)|| / ||f(x)||

Both norms are taken over the positions the transform can compare (see each transform's ``mask``).

The answer, which ``tests/test_equivariance.py`` measures:

* Translation - yes. A convolution (any stride-1 stack of convolutions, pointwise nonlinearities,
  stride-1 pooling) commutes exactly with circular shifts when its padding is circular, and with
  ordinary shifts away from the borders (the padding breaks it within a receptive-field radius of
  the border). A stride ``s`` keeps this only for shifts that are multiples of ``s``.
* Rotation - no, in general. Rotating the input and convolving equals convolving with the filter
  rotated the other way and then rotating: ``w * (R x) = R ((R^-1 w) * x)``. So a layer is
  rotation-equivariant only if its filters are rotation-invariant (an isotropic filter for every
  angle, up to interpolation; a filter with four-fold symmetry for 90 degree turns), or if the bank
  of filters is closed under the rotation: then rotating the input *permutes the feature maps*,
  and a max over each rotation group (``ChannelMaxPool``) is rotation-equivariant as a map and
  invariant per position - the lecture's "learned invariance" (and group convolutions, Cohen &
  Welling, ICML 2016).
* Scaling - no. ``w * (S x) = S ((S^-1 w) * x)`` with a filter of another size, which the layer
  does not have. Only pointwise (1x1) layers commute with resampling. Scale invariance needs
  filters or pooling across several scales (an image pyramid) - the lecture's "How to achieve
  scaling invariance?".

Usage: ``from cnnkit.analysis.equivariance import equivariance_error, Rotation``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ConfigError

__all__ = ["Rotation", "Scaling", "Translation", "equivariance_error", "invariance_error"]


def _affine_resample(t: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``out(p) = t(matrix @ p)`` for a (B, C, H, W) map; ``p`` = (x right, y down) pixels from the centre.

    Bilinear, zeros outside. ``align_corners=True`` puts integer coordinates on pixel centres, so an
    exact pixel-grid transform samples exactly.
    """
    H, W = t.shape[-2:]
    ys = torch.arange(H, dtype=t.dtype, device=t.device) - (H - 1) / 2
    xs = torch.arange(W, dtype=t.dtype, device=t.device) - (W - 1) / 2
    p = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
    q = p @ matrix.to(t).T  # (H, W, 2) source positions
    grid = torch.stack([q[..., 0] / max((W - 1) / 2, 0.5), q[..., 1] / max((H - 1) / 2, 0.5)], dim=-1)
    return F.grid_sample(t, grid.expand(t.shape[0], H, W, 2), mode="bilinear", padding_mode="zeros",
                         align_corners=True)


def _disc(shape: tuple[int, int], radius: float, device) -> torch.Tensor:
    H, W = shape
    ys = torch.arange(H, device=device, dtype=torch.float64) - (H - 1) / 2
    xs = torch.arange(W, device=device, dtype=torch.float64) - (W - 1) / 2
    return ys[:, None] ** 2 + xs[None, :] ** 2 <= radius**2 + 1e-9  # (H, W)


def _ratio(in_shape, out_shape) -> float:
    return min(o / i for o, i in zip(out_shape, in_shape))


class Translation:
    """Shift by ``shift = (dy, dx)`` input pixels.

    ``mode="circular"``: ``torch.roll``, everything compared (exact for circular padding).
    ``mode="crop"``: the same roll, but only outputs at least ``margin`` input pixels away from the
    map's borders and from the seam where the wrapped-around content meets are compared, so that
    neither padding nor wrap-around reaches them: a shift of an unbounded image.
    A map ``s`` times smaller (stride ``s``) is shifted by ``shift / s``, which must be whole.
    """

    def __init__(self, shift: int | tuple[int, int], mode: str = "circular", margin: int = 0):
        self.shift = (shift, shift) if isinstance(shift, int) else tuple(shift)
        if mode not in ("circular", "crop"):
            raise ConfigError(f"Translation mode must be 'circular' or 'crop', got {mode!r}")
        self.mode, self.margin = mode, margin

    def _scaled_shift(self, in_shape, out_shape) -> tuple[int, int]:
        shift = []
        for s, i, o in zip(self.shift, in_shape, out_shape):
            scaled = s * o / i
            if abs(scaled - round(scaled)) > 1e-9:
                raise ConfigError(f"a shift of {s} pixels is not a whole number of output pixels "
                                  f"(input {i}, output {o}); shift by a multiple of the module's stride")
            shift.append(round(scaled))
        return tuple(shift)

    def __call__(self, t: torch.Tensor, in_shape: tuple[int, int] | None = None) -> torch.Tensor:
        shift = self.shift if in_shape is None else self._scaled_shift(in_shape, t.shape[-2:])
        return torch.roll(t, shifts=shift, dims=(-2, -1))

    def mask(self, out_shape: tuple[int, int], in_shape: tuple[int, int], device) -> torch.Tensor:
        if self.mode == "circular":
            return torch.ones(out_shape, dtype=torch.bool, device=device)
        m = math.ceil(self.margin * _ratio(in_shape, out_shape))
        axes = []
        for n, s in zip(out_shape, self._scaled_shift(in_shape, out_shape)):
            i = torch.arange(n, device=device)
            seam = (i - s) % n  # distance after the seam, in wrapped coordinates
            axes.append((i >= m) & (i < n - m) & (seam >= m) & (seam < n - m))
        return axes[0][:, None] & axes[1][None, :]


class Rotation:
    """Rotate by ``angle`` degrees about the map's centre (counter-clockwise as displayed).

    Multiples of 90 degrees use ``torch.rot90``: exact, and every position is compared. Other angles
    resample bilinearly, and resampling does not commute exactly with filtering: an isotropic
    Gaussian blur measures this floor (about 0.09 on white noise, far less on smooth images);
    compared is the central disc of radius ``(min(H, W) - 1) / 2 - margin``, which the rotation maps
    onto itself (``margin``: the module's receptive-field radius, so that the zeros rotated into the
    corners cannot reach it).
    """

    def __init__(self, angle: float, margin: float = 0):
        self.angle, self.margin = float(angle), margin
        self.quarter_turns = round(self.angle / 90) if self.angle % 90 == 0 else None

    def __call__(self, t: torch.Tensor, in_shape: tuple[int, int] | None = None) -> torch.Tensor:
        if self.quarter_turns is not None:
            return torch.rot90(t, self.quarter_turns % 4, dims=(-2, -1))
        a = math.radians(self.angle)
        return _affine_resample(t, torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]))

    def mask(self, out_shape: tuple[int, int], in_shape: tuple[int, int], device) -> torch.Tensor:
        if self.quarter_turns is not None:  # the pixel grid maps onto itself: compare everything
            return torch.ones(out_shape, dtype=torch.bool, device=device)
        return _disc(out_shape, (min(out_shape) - 1) / 2 - self.margin * _ratio(in_shape, out_shape), device)


class Scaling:
    """Magnify by ``factor`` about the centre (``out(p) = in(p / factor)``), bilinear.

    Compared: the central disc on which both sides only sample real content: radius
    ``((min(H, W) - 1) / 2 - margin) * min(1, factor)``.
    """

    def __init__(self, factor: float, margin: float = 0):
        if not factor > 0:
            raise ConfigError(f"Scaling factor must be positive, got {factor!r}")
        self.factor, self.margin = float(factor), margin

    def __call__(self, t: torch.Tensor, in_shape: tuple[int, int] | None = None) -> torch.Tensor:
        return _affine_resample(t, torch.eye(2) / self.factor)

    def mask(self, out_shape: tuple[int, int], in_shape: tuple[int, int], device) -> torch.Tensor:
        radius = (min(out_shape) - 1) / 2 - self.margin * _ratio(in_shape, out_shape)
        return _disc(out_shape, radius * min(1.0, self.factor), device)


Transform = Translation | Rotation | Scaling


def _default_input(module: nn.Module, input_shape: tuple[int, ...] | None, seed: int) -> torch.Tensor:
    param = next(iter(module.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    if input_shape is None:
        channels = next((m.in_channels for m in module.modules() if hasattr(m, "in_channels")), None)
        if channels is None:
            raise ConfigError("cannot tell the module's input channels; pass x or input_shape=(B, C, H, W)")
        input_shape = (2, channels, 33, 33)  # odd sides: rotations are about a pixel centre
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(input_shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def _responses(module, transform, x, input_shape, seed):
    if not isinstance(transform, (Translation, Rotation, Scaling)):
        raise ConfigError(f"transform must be a Translation, Rotation or Scaling, "
                          f"got {type(transform).__name__}")
    x = _default_input(module, input_shape, seed) if x is None else x
    if x.dim() != 4:
        raise ConfigError(f"equivariance is measured on (B, C, H, W) inputs, got shape {tuple(x.shape)}")
    with torch.no_grad():
        return x, module(x), module(transform(x))


def _relative(diff: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is not None:
        if not bool(mask.any()):
            raise ConfigError("no output position is left to compare; use a larger input or a smaller margin")
        diff, ref = diff * mask, ref * mask
    ref_norm = float(ref.double().norm())
    if ref_norm == 0:
        raise ConfigError("the module's response is zero on the compared positions; use another input")
    return float(diff.double().norm()) / ref_norm


def equivariance_error(module: nn.Module, transform: Transform, x: torch.Tensor | None = None, *,
                       input_shape: tuple[int, ...] | None = None, seed: int = 0) -> float:
    """``||f(g x) - g f(x)|| / ||f(x)||`` on the positions ``transform.mask`` selects (0: equivariant).

    ``x`` defaults to Gaussian noise of ``input_shape`` (default (2, C, 33, 33), C read from the first
    submodule with ``in_channels``). The module runs as it is (call ``.eval()`` first if it matters),
    without gradients. The output must be a (B, C, H, W) map.
    """
    x, fx, fgx = _responses(module, transform, x, input_shape, seed)
    if fx.dim() != 4:
        raise ConfigError(f"equivariance needs a (B, C, H, W) output, got shape {tuple(fx.shape)}; "
                          f"use invariance_error for vector outputs")
    gfx = transform(fx, tuple(x.shape[-2:]))
    if gfx.shape != fgx.shape:
        raise ConfigError(f"f(g x) has shape {tuple(fgx.shape)} but g f(x) has {tuple(gfx.shape)}; "
                          f"the module does not map a transformed input to a transformed output")
    mask = transform.mask(tuple(fx.shape[-2:]), tuple(x.shape[-2:]), fx.device)
    return _relative(fgx - gfx, fx, mask)


def invariance_error(module: nn.Module, transform: Transform, x: torch.Tensor | None = None, *,
                     input_shape: tuple[int, ...] | None = None, seed: int = 0) -> float:
    """``||f(g x) - f(x)|| / ||f(x)||`` (0: invariant). Map outputs are compared on ``transform.mask``."""
    x, fx, fgx = _responses(module, transform, x, input_shape, seed)
    if fgx.shape != fx.shape:
        raise ConfigError(f"f(g x) has shape {tuple(fgx.shape)} but f(x) has {tuple(fx.shape)}")
    mask = transform.mask(tuple(fx.shape[-2:]), tuple(x.shape[-2:]), fx.device) if fx.dim() == 4 else None
    return _relative(fgx - fx, fx, mask)
