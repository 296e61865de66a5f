"""``cnnkit augment IMAGE --show OUT.png``: see what each training-time augmentation does to an image."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnkit.cli.argtypes import positive_int, seed
from cnnkit.errors import ConfigError

# (row label, spec) shown by default: the lecture's augmentations, with settings that make them visible.
DEFAULT_ROWS = [
    ("original", ""),
    ("crop (AlexNet)", "crop"),
    ("flip", "flip"),
    ("scale S in [256, 512] (VGG)", "scale=256:512"),
    ("aspect / area (GoogLeNet)", "aspect=0.08:1:0.75:1.3333"),
    ("PCA colour noise x10", "pca=1.0"),
    ("colour cast +-20 (Deep Image)", "cast=20"),
    ("vignetting (Deep Image)", "vignette=0.3:0.8"),
    ("barrel / pincushion lens", "lens=0.3"),
    ("rotation +-15 deg", "rotate=15"),
    ("grayscale", "gray"),
]


def run_augment(args: argparse.Namespace) -> int:
    import torch

    from cnnkit.data import load_image
    from cnnkit.data.augment import parse_augment, rgb_pca
    from cnnkit.train.plots import plot_augmentations

    if args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")
    load, crop = args.load_size, args.crop_size
    if crop[0] > load[0] or crop[1] > load[1]:
        raise ConfigError(f"--crop-size {crop[0]}x{crop[1]} is larger than --load-size {load[0]}x{load[1]}")
    image = load_image(args.image, channels=3, size=load)  # (3, H, W)
    pca = rgb_pca(image[None])
    rows = [(spec, spec) for spec in args.augment] if args.augment else DEFAULT_ROWS
    generator = torch.Generator().manual_seed(args.seed)
    grid = []
    for label, spec in rows:
        transform = parse_augment(spec, crop, pca=pca)
        batch = image[None].expand(args.samples, -1, -1, -1).contiguous()
        grid.append((label, transform(batch, generator).clamp(0, 1) if len(transform) else batch))
    plot_augmentations(grid, args.show, title=f"{Path(args.image).name}: {args.samples} samples per row (seed "
                       f"{args.seed})")
    print(f"wrote {args.show} ({len(grid)} rows x {args.samples} samples)")
    return 0


def register(sub) -> None:
    from cnnkit.cli.train import parse_size

    p = sub.add_parser(
        "augment", help="draw samples of each training-time augmentation as a PNG grid",
        description="Load IMAGE at --load-size, apply each augmentation --samples times (one row each, "
        "labelled) and write the grid to --show. Rows: crop, flip, VGG scale jittering, GoogLeNet's area and "
        "aspect-ratio crop, AlexNet's PCA colour noise (here from the image's own colours, 10x stronger so it "
        "shows), Deep Image's colour casting, vignetting, lens distortion and rotation, and grayscale; or "
        "your own pipelines with --augment (one row per SPEC, the syntax of `cnnkit train --augment`).",
    )
    p.add_argument("image", type=Path, help="an image file (any format Pillow reads)")
    p.add_argument("--show", type=Path, required=True, metavar="OUT.png", help="where to write the PNG grid")
    p.add_argument("--samples", type=positive_int, default=6, help="samples per augmentation (default 6)")
    p.add_argument("--load-size", type=parse_size, default=(256, 256), metavar="HxW",
                   help="size the image is loaded at (default 256)")
    p.add_argument("--crop-size", type=parse_size, default=(224, 224), metavar="HxW",
                   help="the model input size crops are cut to (default 224)")
    p.add_argument("--augment", nargs="+", metavar="SPEC", help="rows to show instead of the default ones")
    p.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    p.set_defaults(func=run_augment)
