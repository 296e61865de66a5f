"""Borders and tiles: where every pixel's patch comes from, and how a large image is cut.

Centring convention (used by the dense net and by ``patch_by_patch`` alike): for a patch of P
pixels along an axis, pixel i's patch covers positions ``i - (P - 1) // 2 ... i + P // 2``. For odd
P the pixel is the centre; for even P it is the lower of the two central positions (e.g. P = 64:
rows i - 31 ... i + 32). The image is padded once by ``(P - 1) // 2`` before and ``P // 2`` after
(zeros, reflect or replicate), so every pixel has its patch.

Tiles: the output is cut into tiles of ``T`` pixels; a tile reads ``T + P - 1`` padded input
pixels (a halo of P - 1). The dense computation of an output pixel only ever reads its own patch,
so tiling changes nothing but the peak memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from cnnkit.dense.ops import preferred_format
from cnnkit.errors import ConfigError

BORDERS = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}


def patch_span(p: int) -> tuple[int, int]:
    """(before, after): pixel i's patch covers i - before ... i + after."""
    return (p - 1) // 2, p // 2


def pad_image(x: torch.Tensor, patch: Sequence[int], border: str = "zeros",
              extra: Sequence[int] | None = None) -> torch.Tensor:
    """Pad the spatial axes of ``x`` (N, C, *L) so that every pixel has its patch."""
    if border not in BORDERS:
        raise ConfigError(f"unknown border {border!r}; use one of {', '.join(BORDERS)}")
    extra = extra or (0,) * len(patch)
    spec: list[int] = []
    for p, e, n in zip(reversed(patch), reversed(extra), reversed(x.shape[2:])):
        before, after = patch_span(p)
        if border == "reflect" and max(before, after + e) >= n:
            raise ConfigError(f"border='reflect' needs image sides above {max(before, after + e)} for "
                              f"patch {p} (got {n}); use border='replicate' or 'zeros'")
        spec += [before, after + e]
    if not any(spec):
        return x
    return F.pad(x, spec, mode=BORDERS[border])


def run_tiled(core: Callable[[torch.Tensor], torch.Tensor], xp: torch.Tensor, out_size: Sequence[int],
              patch: Sequence[int], tile: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``core`` (a dense net on padded input) tile by tile; ``xp`` is the padded image.

    Every tile has the same shape (a tile running past the end of the padded image is extended
    with zeros), so each tile runs exactly the kernels the untiled image runs: results agree bit for
    bit. Each tile's output is copied into ``out`` (N x K x *out_size; allocated at the first tile
    when None): allocated before any tile, it is not left in the middle of freed tile maps.
    """
    counts = [-(-n // t) for n, t in zip(out_size, tile)]
    for idx in itertools.product(*(range(c) for c in counts)):
        starts = [i * t for i, t in zip(idx, tile)]
        region = (..., *(slice(s, s + t + p - 1) for s, t, p in zip(starts, tile, patch)))
        part = xp[region]
        short = [s + t + p - 1 - n for s, t, p, n in zip(starts, tile, patch, xp.shape[2:])]
        if any(g > 0 for g in short):  # the last tiles run past the image: zeros, cropped below
            part = F.pad(part, [g for gr in reversed(short) for g in (0, max(0, gr))])
            part = part.contiguous(memory_format=preferred_format(part))
        y = core(part)
        if out is None:
            out = torch.empty((y.shape[0], y.shape[1], *out_size), dtype=y.dtype, device=y.device,
                              memory_format=preferred_format(y))
        keep = [min(t, n - s) for s, t, n in zip(starts, tile, out_size)]
        out[(..., *(slice(s, s + k) for s, k in zip(starts, keep)))] = y[(..., *(slice(0, k) for k in keep))]
        del y, part
    assert out is not None
    return out
