"""Segmentation data: image/mask pairs as users bring them, and a generated default that needs context.

Masks are decoded into class indices (int64), with ``IGNORE_INDEX`` for unlabelled pixels and for
pixels outside an optional valid region (e.g. DRIVE's field-of-view masks). Mask files may be:

- class-index PNGs (grey or palette mode: the stored index is the class, VOC-style),
- binary masks (0/255, or any grey image thresholded at 128, e.g. JPEG masks),
- colour masks with a palette (a list of RGB colours; colour i is class i, except that entry
  ``ignore_value`` (if given) marks unlabelled pixels).

Images are float32 (C, H, W) in [0, 1]. An image and its mask pair by an exact *key*: the file
stem without one trailing suffix from a known list (``IMAGE_KEY_SUFFIXES`` for images,
``MASK_KEY_SUFFIXES`` for masks, ``VALID_KEY_SUFFIXES`` for valid-region masks). DRIVE:
``21_training.tif`` (key ``21``) <-> ``21_manual1.gif`` (key ``21``), and its field of view
``21_training_mask.gif`` (key ``21_training``, the image's stem). Equal stems pair first. Anything
that does not pair one to one is an error (or, asked for, skipped and counted); nothing is ever
matched by a prefix, so an image never silently gets another image's mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cnnkit.data.images import open_image
from cnnkit.dense.loss import IGNORE_INDEX  # torch's cross-entropy default: unlabelled
from cnnkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)
T = TypeVar("T")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp", ".ppm", ".pgm"}  # file types
MASK_MODES = ("auto", "index", "binary", "palette")
# endings dropped from a file's stem to give its pairing key (one at most, the longest that matches)
IMAGE_KEY_SUFFIXES = ("_training", "_test", "_image", "_img")
MASK_KEY_SUFFIXES = ("_manual1", "_mask", "_masks", "_label", "_labels", "_gt", "_seg", "_segmentation",
                     "_annotation")
VALID_KEY_SUFFIXES = ("_mask", "_fov", "_roi", "_valid")
# what Pillow raises on files that are not what their name says: a text file named .png
# (UnidentifiedImageError, an OSError), a truncated or corrupt stream (OSError), odd headers
# (SyntaxError, ValueError, EOFError). An image too large to be genuine is refused by open_image.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


@dataclass
class SegmentationSample:
    name: str
    image: torch.Tensor  # (C, H, W) float32 in [0, 1]
    target: torch.Tensor  # (H, W) int64 class indices, IGNORE_INDEX where unlabelled or outside `valid`
    valid: torch.Tensor | None = None  # (H, W) bool: the region to score and train on (DRIVE's FOV)
    mask_file: Path | None = None  # where `target` came from, for error messages


def _read(path: Path, what: str, to_array: Callable[[Image.Image], T]) -> T:
    """Open an image file and turn it into an array, any failure as one DataError naming the file."""
    try:
        with open_image(path, what) as im:
            im.load()
            return to_array(im)
    except _READ_ERRORS as exc:
        reason = str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__
        raise DataError(f"cannot read {what} {path}: {reason}; re-save it as PNG or TIFF, or remove it") from None


def _image_array(im: Image.Image, channels: int | None) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I"):
        arr = np.asarray(im, dtype=np.float32) / (65535.0 if im.mode.startswith("I;16") else 1.0)
        return arr[None]
    mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if im.mode in ("L", "1", "LA") else "RGB")
    arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image(path: Path, channels: int | None = None) -> torch.Tensor:
    """(C, H, W) float32 in [0, 1] (16-bit greys scaled by 65535); ``channels`` 1 or 3 converts."""
    arr = _read(path, "image", lambda im: _image_array(im, channels))
    if channels == 3 and arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    return torch.from_numpy(np.ascontiguousarray(arr))


def decode_mask(path: Path, mode: str = "auto", palette: Sequence[Sequence[int]] | None = None,
                ignore_value: int | None = None) -> torch.Tensor:
    """Mask file -> (H, W) int64 class indices (IGNORE_INDEX where ``ignore_value``)."""
    arr, pil_mode = read_mask_array(path, mode)
    return decode_labels(arr, pil_mode, path, mode, palette, ignore_value)


def read_mask_array(path: Path, mode: str = "auto") -> tuple[np.ndarray, str]:
    """A mask file's stored values (H, W) or (H, W, C), and its Pillow mode."""
    if mode not in MASK_MODES:
        raise DataError(f"unknown mask mode {mode!r}; use one of {', '.join(MASK_MODES)}")
    return _read(path, "mask", lambda im: mask_array(im, mode))


def mask_array(im: Image.Image, mode: str) -> tuple[np.ndarray, str]:
    # binary masks are grey levels: a palette image (GIF) is read through its palette
    return np.asarray(im.convert("L") if mode == "binary" and im.mode in ("P", "1") else im), im.mode


def decode_labels(arr: np.ndarray, pil_mode: str, path: Path, mode: str = "auto",
                  palette: Sequence[Sequence[int]] | None = None, ignore_value: int | None = None,
                  spatial: int = 2) -> torch.Tensor:
    """Stored mask values, ``spatial`` axes (2: (H, W), 3: a volume (D, H, W)) and an optional colour
    axis last, -> int64 class indices; ``pil_mode`` "P" marks palette images (read as indices)."""
    if mode not in MASK_MODES:
        raise DataError(f"unknown mask mode {mode!r}; use one of {', '.join(MASK_MODES)}")
    colour = arr.ndim == spatial + 1
    if colour:
        arr = arr[..., :3]
        if palette is None and (arr == arr[..., :1]).all():
            arr, colour = arr[..., 0], False  # a grey image stored as RGB
    ignore = None
    if not colour and ignore_value is not None:
        ignore = arr == ignore_value
    if mode == "auto":
        mode = _guess_mode(arr, pil_mode, ignore, path, colour)
    if mode == "palette":
        out = _decode_palette(arr, palette, ignore_value, path, colour)
    elif mode == "binary":
        out = None if colour else (arr > 127).astype(np.int64)
    else:
        out = None if colour else arr.astype(np.int64)
    if out is None:
        raise DataError(f"mask {path} is a colour image; pass a palette (--palette) to decode it")
    if ignore is not None:
        out[ignore] = IGNORE_INDEX
    return torch.from_numpy(out)


def _guess_mode(arr: np.ndarray, pil_mode: str, ignore: np.ndarray | None, path: Path, colour: bool) -> str:
    if colour:
        return "palette"
    if pil_mode == "P":
        return "index"
    values = np.unique(arr if ignore is None else arr[~ignore])
    if set(values.tolist()) <= {0, 255}:
        return "binary"
    if values.max(initial=0) < 64 and values.size <= 64:
        return "index"
    log.warning("mask %s has %d grey levels; reading it as binary (threshold 128)", path, values.size)
    return "binary"


def _decode_palette(arr, palette, ignore_value, path, colour: bool) -> np.ndarray:
    if not colour:
        raise DataError(f"mask {path} is not a colour image but a palette was given; drop --palette")
    if palette is None:
        raise DataError(f"mask {path} is a colour image; pass a palette (--palette) to decode it")
    out = np.full(arr.shape[:-1], -1, dtype=np.int64)
    for i, colour in enumerate(palette):
        # a palette entry equal to ignore_value (by index) marks unlabelled pixels
        out[(arr == np.asarray(colour, dtype=arr.dtype)).all(-1)] = IGNORE_INDEX if i == ignore_value else i
    if (out == -1).any():
        bad = arr[out == -1][0].tolist()
        raise DataError(f"mask {path} has colour {tuple(bad)} which is not in the palette")
    return out


def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise DataError(f"folder {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no image files in {directory}")
    return files


# --------------------------------------------------------------------------- pairing


def file_key(path: Path, suffixes: Sequence[str]) -> str:
    """The stem without the longest of ``suffixes`` it ends with (never emptied), else the stem."""
    stem = path.stem
    for suffix in sorted(suffixes, key=len, reverse=True):
        if suffix and stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def pair_files(images: Sequence[Path], others: Sequence[Path], what: str, *,
               suffixes: Sequence[str] = MASK_KEY_SUFFIXES, image_suffixes: Sequence[str] = IMAGE_KEY_SUFFIXES,
               skip_unpaired: bool = False) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Pair every image with its ``what`` file (a mask, a valid-region mask): ``(pairs, skipped)``.

    A file answers to its stem and to its key (:func:`file_key` with ``image_suffixes`` for images,
    ``suffixes`` for the others). Files with equal stems pair first; the rest pair when an image and
    a file answer to a common name and neither answers to any other file. An image without its
    file, a file without its image, or several files for one name is a DataError naming them, or
    with ``skip_unpaired`` they are left out, counted in ``skipped`` and logged once. Pairs come in
    the order of ``images``.
    """
    names = {p: (p.stem, file_key(p, image_suffixes)) for p in images}
    names.update({p: (p.stem, file_key(p, suffixes)) for p in others})
    match: dict[Path, list[Path]] = {}
    # an equal stem decides; a key is only asked of files without a stem twin
    for side, other_side in ((images, others), (others, images)):
        by_stem = _index(other_side, lambda q: (q.stem,))
        for p in side:
            match[p] = by_stem.get(p.stem, [])
    free_images = [p for p in images if not match[p]]
    free_others = [p for p in others if not match[p]]
    for side, other_side in ((free_images, free_others), (free_others, free_images)):
        by_name = _index(other_side, names.__getitem__)
        for p in side:
            match[p] = list(dict.fromkeys(q for n in names[p] for q in by_name.get(n, [])))
    pairs = [(i, match[i][0]) for i in images if len(match[i]) == 1 and match[match[i][0]] == [i]]
    paired = {p for pair in pairs for p in pair}
    skipped = [p for p in [*images, *others] if p not in paired]
    if skipped and not skip_unpaired:
        raise DataError(_pairing_problem(skipped, match, names, images, others, what, suffixes, image_suffixes))
    if skipped:
        log.warning("skipped %d files that do not pair one image to one %s (%s, ...)", len(skipped), what,
                    ", ".join(p.name for p in skipped[:3]))
    return pairs, skipped


def _index(files: Sequence[Path], names_of: Callable[[Path], Sequence[str]]) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for p in files:
        for n in dict.fromkeys(names_of(p)):
            index.setdefault(n, []).append(p)
    return index


def _pairing_problem(skipped, match, names, images, others, what, suffixes, image_suffixes) -> str:
    """One line: the first file that did not pair, why, how many more, and the fix."""
    p = skipped[0]
    image_dir = images[0].parent if images else "?"
    other_dir = others[0].parent if others else "?"
    group = {p}
    if not match[p]:
        first = (f"no {what} for image {p.name} in {other_dir}" if p in images
                 else f"{what} {p.name} has no image in {image_dir}")
    else:
        group = {p, *match[p], *(q for r in match[p] for q in match[r])}
        shared = set.intersection(*(set(names[q]) for q in group))
        listed = [", ".join(sorted(q.name for q in group if q in side)) + f" in {folder}"
                  for side, folder in ((images, image_dir), (others, other_dir)) if group & set(side)]
        key = f" {min(shared)!r}" if shared else ""
        first = f"{' and '.join(listed)} have the same key{key}"
    rest = len([q for q in skipped if q not in group])
    more = f" (and {rest} more unpaired files)" if rest else ""
    return (f"{first}{more}; an image and its {what} pair by name after dropping one suffix "
            f"({'/'.join(image_suffixes)} from images, {'/'.join(suffixes)} from {what}s): "
            "rename the files, name the suffix (--image-suffix, --mask-suffix), or pass --skip-unpaired")


# --------------------------------------------------------------------------- resizing and loading


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) multiplied by ``scale`` and rounded, at least 1 x 1."""
    if not scale > 0:
        raise ConfigError(f"--scale must be positive, got {scale}")
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) float -> (C, *size): bilinear, antialiased when shrinking (no aliasing of thin vessels)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return out.clamp_(0, 1) if image.min() >= 0 and image.max() <= 1 else out


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) class indices or bool -> (*size), nearest neighbour (pixel centres), same dtype."""
    if tuple(labels.shape) == tuple(size):
        return labels
    # float64 holds every int64 class index and IGNORE_INDEX exactly
    out = F.interpolate(labels[None, None].double(), size=size, mode="nearest-exact")[0, 0]
    return out.bool() if labels.dtype == torch.bool else out.to(labels.dtype)


def load_folder(root: Path, images: str = "images", masks: str = "masks", valid: str | None = None, *,
                mask_mode: str = "auto", palette=None, ignore_value: int | None = None,
                channels: int | None = None, resize_to_mask: bool = False, scale: float | None = None,
                size: tuple[int, int] | None = None, skip_unpaired: bool = False,
                mask_suffix: str | None = None, image_suffix: str | None = None) -> list[SegmentationSample]:
    """Read ``root/images`` with ``root/masks`` (and ``root/valid`` region masks, nonzero = valid).

    Pairing is :func:`pair_files`; ``mask_suffix`` / ``image_suffix`` replace the default suffix
    lists (Cityscapes: ``_gtFine_labelIds`` / ``_leftImg8bit``). An image whose size differs from
    its mask is an error, or with ``resize_to_mask`` resized to the mask (Weizmann horses' ``rgb/``).
    Then ``scale`` (a factor) or ``size`` (H, W) resizes image (bilinear), target and valid (nearest).
    """
    if scale is not None and size is not None:
        raise ConfigError("give --scale or --size, not both")
    root = Path(root)
    image_suffixes = (image_suffix,) if image_suffix else IMAGE_KEY_SUFFIXES
    image_files = _files(root / images)
    pairs, _ = pair_files(image_files, _files(root / masks), "mask", skip_unpaired=skip_unpaired,
                          suffixes=(mask_suffix,) if mask_suffix else MASK_KEY_SUFFIXES,
                          image_suffixes=image_suffixes)
    regions: dict[Path, Path] = {}
    if valid:
        valid_pairs, _ = pair_files(image_files, _files(root / valid), "valid-region mask",
                                    suffixes=VALID_KEY_SUFFIXES, image_suffixes=image_suffixes,
                                    skip_unpaired=skip_unpaired)
        regions = dict(valid_pairs)
        pairs = [(i, m) for i, m in pairs if i in regions]
    samples = []
    for ip, mp in pairs:
        target = decode_mask(mp, mask_mode, palette, ignore_value)
        image = load_image(ip, channels)
        if image.shape[1:] != target.shape:
            if not resize_to_mask:
                raise DataError(f"image {ip} is {image.shape[2]}x{image.shape[1]} but its mask {mp.name} is "
                                f"{target.shape[1]}x{target.shape[0]}; resize one, or pass --resize-to-mask")
            image = resize_image(image, tuple(target.shape))
        region = None
        if valid:
            region = decode_mask(regions[ip], "binary") != 0
            if region.shape != target.shape:
                raise DataError(f"valid-region mask {regions[ip]} is {region.shape[1]}x{region.shape[0]} but "
                                f"mask {mp.name} is {target.shape[1]}x{target.shape[0]}; give matching files")
        new_size = scaled_size(tuple(target.shape), scale) if scale is not None else size
        if new_size is not None:
            image, target = resize_image(image, new_size), resize_labels(target, new_size)
            region = resize_labels(region, new_size) if region is not None else None
        if region is not None:
            target[~region] = IGNORE_INDEX
        samples.append(SegmentationSample(ip.stem, image, target, region, mp))
    return samples


def num_classes_of(samples: Sequence[SegmentationSample]) -> int:
    top = max(int(s.target.max()) for s in samples)
    return max(2, top + 1)


def check_classes(samples: Sequence[SegmentationSample], num_classes: int) -> None:
    """A DataError naming the first mask with a value that is no class in ``0 .. num_classes - 1``."""
    for s in samples:
        bad = (s.target != IGNORE_INDEX) & ((s.target < 0) | (s.target >= num_classes))
        if bad.any():
            value = int(s.target[bad].max())
            raise DataError(f"mask {s.mask_file or s.name} has value {value} but there are {num_classes} classes "
                            f"(0..{num_classes - 1}); raise the number of classes to {value + 1}, or mark "
                            f"{value} unlabelled (--ignore-value {value})")


def split_samples(samples: Sequence[SegmentationSample], val_fraction: float, seed: int
                  ) -> tuple[list[SegmentationSample], list[SegmentationSample]]:
    """(train, val): a seeded random ``val_fraction`` of the images held out, at least one on each side.

    ``val_fraction`` 0 holds out nothing. Each part keeps the input order.
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n = len(samples)
    if val_fraction == 0:
        return list(samples), []
    if n < 2:
        raise DataError(f"{n} image cannot be split into training and validation; add images, "
                        "give a validation folder, or pass --val-fraction 0")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = set(order[:n_val].tolist())
    return ([s for k, s in enumerate(samples) if k not in held],
            [s for k, s in enumerate(samples) if k in held])


# --------------------------------------------------------------------------- generated default


def _stripes(h: int, w: int, angle: float, period: float, phase: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u = x * math.cos(angle) + y * math.sin(angle)
    return np.sign(np.sin(2 * math.pi * u / period + phase)).astype(np.float32)


def _blobs(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Isotropic texture: smoothed noise, thresholded to the same two values as the stripes."""
    noise = rng.standard_normal((h, w)).astype(np.float32)
    k = np.array([1, 4, 6, 4, 1], dtype=np.float32)
    k /= k.sum()
    for axis in (0, 1):
        noise = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, noise)
    return np.sign(noise).astype(np.float32)


def generate_textured_shapes(n: int = 32, size: int = 64, seed: int = 0, num_classes: int = 3
                             ) -> list[SegmentationSample]:
    """Textured shapes on a textured background where one pixel's value says nothing about its
    class: every region is a two-level texture with the same grey values. Background: isotropic
    blobs; class 1: horizontal-ish stripes; class 2: vertical-ish stripes (and, with 4 classes,
    diagonal ones). Shapes are random discs and rectangles. A classifier needs the pixel's
    neighbourhood (a patch of ~10 pixels) to tell the orientation.
    """
    if not 2 <= num_classes <= 4:
        raise DataError(f"generated data has 2 to 4 classes, got {num_classes}")
    rng = np.random.default_rng(seed)
    angles = [0.0, math.pi / 2, math.pi / 4][: num_classes - 1]
    samples = []
    for i in range(n):
        label = np.zeros((size, size), dtype=np.int64)
        texture = _blobs(size, size, rng)
        y, x = np.mgrid[0:size, 0:size]
        for _ in range(int(rng.integers(2, 5))):
            cls = int(rng.integers(1, num_classes))
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(size / 8, size / 4)
            if rng.random() < 0.5:
                region = (y - cy) ** 2 + (x - cx) ** 2 < r**2
            else:
                region = (abs(y - cy) < r) & (abs(x - cx) < r * rng.uniform(0.6, 1.4))
            angle = angles[cls - 1] + rng.uniform(-0.2, 0.2)
            tex = _stripes(size, size, angle, rng.uniform(4.0, 6.0), rng.uniform(0, 2 * math.pi))
            texture = np.where(region, tex, texture)
            label = np.where(region, cls, label)
        tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
        img = 0.5 + 0.3 * texture[None] * tint[:, None, None]
        img = img + rng.normal(0, 0.05, size=img.shape).astype(np.float32)
        image = torch.from_numpy(np.clip(img, 0, 1).astype(np.float32))
        samples.append(SegmentationSample(f"generated_{i:03d}", image, torch.from_numpy(label)))
    return samples
