"""Joint augmentation of an image and its mask, and the preprocessing every image gets.

A geometric augmentation must move the image, its target and its valid region identically, so every
augmentation works in two steps: ``draw(generator, size)`` draws the random parameters of one image
from an explicit ``torch.Generator`` (never the global RNG); ``apply(image, target, valid, params)``
applies that one draw to

- the image, (C, H, W) float as loaded in [0, 1]: bilinear (or ``image_mode="nearest"``),
- the target, (H, W) int64 class indices with IGNORE_INDEX: nearest, IGNORE_INDEX kept,
- the valid region, (H, W) bool (None = everything valid): nearest.

=================  ================================================================================
``flip``           left-right mirror with probability 1/2 (safe for most scenes; the default)
``dihedral``       one of the 8 symmetries of the square, uniformly: k & 4 flips left-right first,
                   k & 3 quarter turns follow (rotations swap H and W of a non-square image)
``elastic=A:S``    Simard, Steinkraus, Platt, ICDAR 2003, Sec. 2: every pixel's displacement is
                   uniform in [-1, 1] per axis, smoothed by a Gaussian of sigma S pixels and scaled
                   by A pixels (default 34:4, the paper's MNIST setting); pixels fetched from outside
                   the image are IGNORE_INDEX in the target and False in valid (the image reflects)
``intensity=s``    on the image only: gamma exp(U[-s, s]), contrast U[1-s, 1+s] about the per-channel
                   mean (inside valid), brightness + U[-s, s]; clipped to [0, 1]
=================  ================================================================================

Augment images as loaded, then :func:`preprocess` them (the same at training and prediction time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnkit.errors import ConfigError
from cnnkit.segmentation.data import IGNORE_INDEX

AUGMENT_NAMES = ("flip", "dihedral", "elastic", "intensity")
DEFAULT_AUGMENT = "flip,intensity=0.1"
ELASTIC_DEFAULT = (34.0, 4.0)  # Simard et al. 2003 on MNIST: alpha 34, sigma 4 (pixels)
INTENSITY_DEFAULT = 0.1
NORMALIZE_MODES = ("image", "none")
CONTRAST_MODES = ("none", "clahe")
# the usual CLAHE setting for fundus images (OpenCV's createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)))
CLAHE_CLIP = 2.0
CLAHE_GRID = (8, 8)


# --------------------------------------------------------------------------- the transforms


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetry ``k`` in 0..7 of the square on the last two axes: flip left-right if k & 4, then k & 3
    quarter turns counter-clockwise."""
    if k & 4:
        x = x.flip(-1)
    return torch.rot90(x, k & 3, dims=(-2, -1))


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """Undo :func:`dihedral` (e.g. to map a prediction on a transformed image back)."""
    x = torch.rot90(x, -(k & 3), dims=(-2, -1))
    return x.flip(-1) if k & 4 else x


def elastic_field(size: tuple[int, int], alpha: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """(2, H, W) float32 displacements (dy, dx) in pixels: U[-1, 1] noise, Gaussian-smoothed, times alpha."""
    h, w = size
    noise = torch.rand((1, 2, h, w), generator=generator) * 2 - 1
    radius = max(1, math.ceil(3 * sigma))
    # replicate: a kernel wider than a small image is still defined (reflect needs radius < side)
    from kornia.filters import gaussian_blur2d  # kornia on first use: it slows every command's start

    smooth = gaussian_blur2d(noise, (2 * radius + 1, 2 * radius + 1), (sigma, sigma), border_type="replicate")
    return smooth[0] * alpha


def warp(image: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, field: torch.Tensor,
         image_mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output pixel (y, x) takes the input at (y + dy, x + dx): image bilinear (reflected at the
    border) or nearest; target and valid nearest, IGNORE_INDEX / False where that lies outside."""
    h, w = target.shape
    field = field.to(image.device)
    ys, xs = torch.meshgrid(*(torch.arange(n, dtype=field.dtype, device=field.device) for n in (h, w)), indexing="ij")
    sy, sx = ys + field[0], xs + field[1]  # (H, W) source coordinates in pixels
    iy, ix = sy.round().long(), sx.round().long()
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    iy, ix = iy.clamp(0, h - 1), ix.clamp(0, w - 1)
    new_target = torch.where(inside, target[iy, ix], IGNORE_INDEX)
    new_valid = valid[iy, ix] & inside
    if image_mode == "nearest":
        return image[:, iy, ix], new_target, new_valid
    # grid_sample's coordinates for align_corners=False: -1 and 1 are the outer edges of the image
    grid = torch.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], dim=-1)  # (H, W, 2) as (x, y)
    new_image = F.grid_sample(image[None], grid[None].to(image.dtype), mode="bilinear", padding_mode="reflection",
                              align_corners=False)[0]
    return new_image, new_target, new_valid


def intensity(image: torch.Tensor, valid: torch.Tensor, gamma: float, contrast: float,
              brightness: float) -> torch.Tensor:
    """Gamma, then contrast about the per-channel mean inside ``valid``, then brightness; in [0, 1]."""
    x = image.clamp(0, 1) ** gamma
    mean = _per_channel(_pixels(x, valid).mean(1), x)
    return ((x - mean) * contrast + mean + brightness).clamp_(0, 1)


def _pixels(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(C, N) the pixels of a (C, H, W) image (or voxels of a (C, D, H, W) volume) where ``valid`` (all
    of them if valid is None or empty)."""
    return x[:, valid] if valid is not None and valid.any() else x.flatten(1)


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(C,) -> (C, 1, 1) for an image, (C, 1, 1, 1) for a volume: broadcasts over ``like``'s pixels."""
    return v.view(-1, *(1,) * (like.dim() - 1))


# --------------------------------------------------------------------------- one spec, drawn and applied


@dataclass(frozen=True)
class AugmentDraw:
    """One image's random parameters; None where that augmentation is off."""

    k: int | None = None  # dihedral symmetry
    field: torch.Tensor | None = None  # (2, H, W) elastic displacements in pixels
    gamma: float | None = None
    contrast: float | None = None
    brightness: float | None = None


@dataclass(frozen=True)
class JointAugment:
    """The augmentations of one spec string; the empty spec is the identity."""

    flip: bool = False  # left-right mirror (the symmetries {0, 4}); dihedral includes it
    dihedral: bool = False
    elastic: tuple[float, float] | None = None  # (alpha, sigma) in pixels
    intensity: float = 0.0
    image_mode: str = "bilinear"  # "nearest" moves image values exactly like the labels (for tests, label maps)

    @classmethod
    def from_spec(cls, spec: str | None, image_mode: str = "bilinear") -> JointAugment:
        """``"dihedral,elastic=34:4,intensity=0.1"``; "" or "none" = no augmentation."""
        kw: dict = {}
        for item in filter(None, (s.strip() for s in (spec or "").split(","))):
            name, _, value = item.partition("=")
            if name == "none" and not value:
                continue
            if name not in AUGMENT_NAMES:
                raise ConfigError(f"unknown augmentation {name!r} in --augment {spec!r}; use "
                                  f"{', '.join(AUGMENT_NAMES)} (e.g. {DEFAULT_AUGMENT!r}) or 'none'")
            if name in kw:
                raise ConfigError(f"augmentation {name!r} is given twice in --augment {spec!r}; give it once")
            kw[name] = _parse_value(name, value, spec)
        if image_mode not in ("bilinear", "nearest"):
            raise ConfigError(f"image_mode must be 'bilinear' or 'nearest', got {image_mode!r}")
        return cls(image_mode=image_mode, **kw)

    def symmetries(self) -> list[int]:
        """The dihedral symmetries (see :func:`dihedral`) training draws from: what test-time averaging
        may use without showing the net something it never saw (e.g. upside-down street scenes)."""
        return list(range(8)) if self.dihedral else [0, 4] if self.flip else [0]

    def spec(self) -> str:
        parts = ["dihedral"] if self.dihedral else ["flip"] if self.flip else []
        if self.elastic is not None:
            parts.append(f"elastic={self.elastic[0]:g}:{self.elastic[1]:g}")
        if self.intensity:
            parts.append(f"intensity={self.intensity:g}")
        return ",".join(parts) or "none"

    def draw(self, generator: torch.Generator, size: tuple[int, int]) -> AugmentDraw:
        """The parameters for one (H, W) image, drawn in a fixed order from ``generator``."""
        k = int(torch.randint(8, (1,), generator=generator)) if self.dihedral else None
        if self.flip and not self.dihedral:
            k = 4 * int(torch.randint(2, (1,), generator=generator))
        field = elastic_field(size, *self.elastic, generator) if self.elastic is not None else None
        if not self.intensity:
            return AugmentDraw(k, field)
        s = self.intensity
        u = (torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1).tolist()  # U[-1, 1]
        return AugmentDraw(k, field, gamma=math.exp(s * u[0]), contrast=1 + s * u[1], brightness=s * u[2])

    def apply(self, image: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, params: AugmentDraw
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The drawn transform on image (C, H, W), target (H, W) and valid (H, W) bool or None (all
        valid); returns all three (valid always a bool tensor)."""
        if valid is None:
            valid = torch.ones(target.shape, dtype=torch.bool, device=target.device)
        if params.field is not None:
            if params.field.shape[1:] != target.shape:
                raise ValueError(f"drawn for a {tuple(params.field.shape[1:])} image, applied to {tuple(target.shape)}")
            image, target, valid = warp(image, target, valid, params.field, self.image_mode)
        if params.gamma is not None:
            if image.min() < -1e-6 or image.max() > 1 + 1e-6:
                # gamma and the [0, 1] clip would silently wreck a standardised image
                raise ValueError("intensity augmentation needs images as loaded, in [0, 1]: augment, then preprocess")
            image = intensity(image, valid, params.gamma, params.contrast, params.brightness)
        if params.k is not None:
            image, target, valid = (dihedral(t, params.k) for t in (image, target, valid))
        return image, target, valid

    def __call__(self, image, target, valid, generator: torch.Generator):
        """Draw and apply in one step."""
        return self.apply(image, target, valid, self.draw(generator, tuple(target.shape)))


def _parse_value(name: str, value: str, spec: str):
    try:
        if name in ("dihedral", "flip"):
            if value:
                raise ValueError
            return True
        if name == "elastic":
            alpha, sigma = (float(v) for v in value.split(":")) if value else ELASTIC_DEFAULT
            if not (alpha >= 0 and sigma > 0):
                raise ValueError
            return alpha, sigma
        strength = float(value) if value else INTENSITY_DEFAULT
        if not 0 <= strength < 1:
            raise ValueError
        return strength
    except ValueError:
        forms = {"dihedral": "dihedral (no value)", "flip": "flip (no value)",
                 "elastic": "elastic=ALPHA:SIGMA (pixels, alpha >= 0, sigma > 0)",
                 "intensity": "intensity=S (0 <= S < 1)"}
        raise ConfigError(f"bad value in --augment {spec!r}: write {forms[name]}") from None


# --------------------------------------------------------------------------- preprocessing


def preprocess(image: torch.Tensor, valid: torch.Tensor | None = None, *, normalize: str = "image",
               contrast: str = "none") -> torch.Tensor:
    """What every image gets before the network, at training and prediction time alike.

    ``contrast="clahe"``: contrast-limited adaptive histogram equalisation per channel (clip 2, 8x8
    tiles, the usual fundus setting; fewer tiles on images under 9 pixels a side) of the image
    clipped to [0, 1]; a volume (C, D, H, W) slice by slice. ``normalize="image"``: per-image,
    per-channel standardisation with the mean and std (population) of the pixels inside ``valid`` (all
    pixels when None; a volume's voxels); pixels outside get the same affine map. ``"none"`` leaves
    either step out.
    """
    if normalize not in NORMALIZE_MODES:
        raise ConfigError(f"unknown normalisation {normalize!r}; use one of {', '.join(NORMALIZE_MODES)}")
    if contrast not in CONTRAST_MODES:
        raise ConfigError(f"unknown contrast enhancement {contrast!r}; use one of {', '.join(CONTRAST_MODES)}")
    if contrast == "clahe" and min(image.shape[-2:]) >= 2:
        # kornia needs more pixels than tiles along each side: fewer tiles on small images
        grid = tuple(min(g, n - 1) for g, n in zip(CLAHE_GRID, image.shape[-2:]))
        from kornia.enhance import equalize_clahe

        slices = image.transpose(0, 1) if image.dim() == 4 else image  # a volume: (D, C, H, W)
        slices = equalize_clahe(slices.clamp(0, 1), clip_limit=CLAHE_CLIP, grid_size=grid)
        image = slices.transpose(0, 1) if image.dim() == 4 else slices
    if normalize == "image":
        pixels = _pixels(image, valid)  # (C, N)
        mean = _per_channel(pixels.mean(1), image)
        std = _per_channel(pixels.std(1, correction=0).clamp_min(1e-6), image)
        image = (image - mean) / std
    return image
