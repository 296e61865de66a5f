"""Deep Image's table of augmentations, counted with cnnkit's own transforms.

The lecture (after Wu et al. 2015, Table 1) lists "the number of possible changes" per kind:
colour casting 68,920; vignetting 1,960; lens distortion 260; rotation 20; flipping 2; cropping 82,944
(224 x 224 crops of a 512 x 512 image). The paper gives no formula. For the discrete transforms the
count is the size of the support of cnnkit's parameter draw, and it is checked by drawing: two million
draws of the transform's own ``draw`` see every value (the chance of missing one is below 1e-10).
Continuous transforms (vignetting, lens, rotation) have no finite count: the paper must have used a
grid of settings that it does not describe, so those three are reported as not reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cnnkit.data.augment import parse_augment
from cnnkit.lecture.section import Number

DRAWS = 2_000_000


@dataclass
class Counts:
    numbers: list[Number]
    markdown: str
    figures: list[str] = field(default_factory=list)


def distinct_draws(spec: str, shape: tuple[int, int, int], size: tuple[int, int], keys: tuple[str, ...]) -> int:
    """How many different parameter tuples ``DRAWS`` draws of the transform produce."""
    (transform,) = parse_augment(spec, size).transforms
    p = transform.draw(DRAWS, shape, torch.Generator().manual_seed(0))
    columns = torch.cat([p[k].reshape(DRAWS, -1).long() for k in keys], dim=1)  # (DRAWS, values)
    columns = columns - columns.min(dim=0).values
    key = torch.zeros(DRAWS, dtype=torch.long)
    for col in columns.T:  # mixed-radix code of each row: one integer per parameter tuple
        key = key * (int(col.max()) + 1) + col
    return len(torch.unique(key))


def deep_image_counts() -> Counts:
    rows: list[Number] = []
    cast = distinct_draws("cast=20", (3, 512, 512), (224, 224), ("offset",))
    rows.append(Number("colour casting: possible changes", "68920", f"{cast - 1:,}", cast - 1 == 68_920,
                       f"`cast=20` adds an integer in [-20, 20] to each of R, G, B: 41^3 = {cast:,} offsets seen "
                       f"in {DRAWS:,} draws, {cast - 1:,} of them a change (a reading of the paper's number, "
                       "which it does not explain)"))
    crops = distinct_draws("crop", (3, 512, 512), (224, 224), ("top", "left"))
    rows.append(Number("cropping 224x224 from 512x512: possible crops", "82944", f"{crops:,}", crops == 82_944,
                       f"cnnkit's crop takes every offset 0..288 on each axis, (512 - 224 + 1)^2 = {crops:,}; "
                       "82,944 = 288^2 leaves out one offset per axis"))
    flips = distinct_draws("flip", (3, 512, 512), (224, 224), ("flip",))
    rows.append(Number("flipping: possible changes", "2", str(flips), flips == 2, "mirrored or not"))
    for what, printed, spec in (("rotation", "20", "rotate=10"), ("vignetting", "1960", "vignette=0.2:0.5"),
                                ("lens distortion", "260", "lens=0.2")):
        rows.append(Number(f"{what}: possible changes", printed, "continuous", None,
                           f"`{spec}` draws its parameter from an interval; the paper's grid of settings is not "
                           "described" + (" (20 could be the whole degrees in [-10, 10] without 0)"
                                          if what == "rotation" else "")))
    total = 68_920 * 1_960 * 260 * 20 * 2 * 82_944
    text = (f"Multiplied, the paper's counts give {total:.3g} different versions of a training image, the "
            "reason the paper can train for many epochs without seeing an image twice.\n")
    return Counts(rows, text)


def draw_augmentations(path: Path, seed: int = 0, samples: int = 5) -> Path:
    """The Deep Image augmentations applied to a real photograph that scikit-learn ships (china.jpg)."""
    from sklearn.datasets import load_sample_image

    from cnnkit.train.plots import plot_augmentations

    photo = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float() / 255  # (3, 427, 640)
    image = torch.nn.functional.interpolate(photo[None], size=(256, 384), mode="bilinear", antialias=True)[0]
    generator = torch.Generator().manual_seed(seed)
    rows = [("original", image[None])]
    for label, spec in (("colour cast +-20", "cast=20"), ("vignetting", "vignette=0.2:0.5"),
                        ("lens distortion", "lens=0.2"), ("rotation +-10 deg", "rotate=10"), ("flip", "flip"),
                        ("crop 224", "crop")):
        transform = parse_augment(spec, (224, 224))
        batch = image[None].expand(samples, -1, -1, -1).contiguous()
        rows.append((label, transform(batch, generator).clamp(0, 1)))
    plot_augmentations(rows, path, title="Deep Image's augmentations on scikit-learn's china.jpg")
    return path
