"""Segmentation data: image/mask folder pairs, and a generated default that needs context.

Masks are decoded into class indices (int64), with ``IGNORE_INDEX`` for unlabelled pixels and for
pixels outside an optional valid region (e.g. DRIVE's field-of-view masks). Mask files may be:

- class-index PNGs (grey or palette mode: the stored index is the class, VOC-style),
- binary masks (0/255, or any grey image thresholded at 128, e.g. JPEG masks),
- colour masks with a palette (a list of RGB colours; colour i is class i, except that entry
  ``ignore_value`` (if given) marks unlabelled pixels).

Images are float32 (C, H, W) in [0, 1]. Pairs are matched by file stem, or else by the part of
the stem before the first underscore (DRIVE: ``21_training.tif`` <-> ``21_manual1.gif``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnkit.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # torch's cross-entropy default
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp", ".ppm", ".pgm"}
MASK_MODES = ("auto", "index", "binary", "palette")


@dataclass
class SegmentationSample:
    name: str
    image: torch.Tensor  # (C, H, W) float32 in [0, 1]
    target: torch.Tensor  # (H, W) int64 class indices, IGNORE_INDEX where unlabelled


def load_image(path: Path, channels: int | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(C, H, W) float32 in [0, 1]; ``channels`` 1 or 3 converts; ``size`` (W, H) resizes."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(im, dtype=np.float32) / (65535.0 if im.mode.startswith("I;16") else 1.0)
                im_f = Image.fromarray(arr, mode="F")
                if size is not None and im_f.size != size:
                    im_f = im_f.resize(size, Image.BILINEAR)
                arr = np.asarray(im_f)[None]
            else:
                mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if im.mode in ("L", "1", "LA") else "RGB")
                im = im.convert(mode)
                if size is not None and im.size != size:
                    im = im.resize(size, Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
                arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    if channels == 3 and arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    return torch.from_numpy(np.ascontiguousarray(arr))


def decode_mask(path: Path, mode: str = "auto", palette: Sequence[Sequence[int]] | None = None,
                ignore_value: int | None = None) -> torch.Tensor:
    """Mask file -> (H, W) int64 class indices (IGNORE_INDEX where ``ignore_value``)."""
    if mode not in MASK_MODES:
        raise DataError(f"unknown mask mode {mode!r}; use one of {', '.join(MASK_MODES)}")
    try:
        with Image.open(path) as im:
            im.load()
            pil_mode = im.mode
            # binary masks are grey levels: a palette image (GIF) is read through its palette
            arr = np.asarray(im.convert("L") if mode == "binary" and im.mode in ("P", "1") else im)
    except OSError as exc:
        raise DataError(f"cannot read mask {path}: {exc}") from None
    if arr.ndim == 3:
        arr = arr[..., :3]
        if palette is None and (arr == arr[..., :1]).all():
            arr = arr[..., 0]  # a grey image stored as RGB
    ignore = None
    if arr.ndim == 2 and ignore_value is not None:
        ignore = arr == ignore_value
    if mode == "auto":
        mode = _guess_mode(arr, pil_mode, ignore, path)
    if mode == "palette":
        out = _decode_palette(arr, palette, ignore_value, path)
    elif mode == "binary":
        out = (arr > 127).astype(np.int64) if arr.ndim == 2 else None
    else:
        out = arr.astype(np.int64) if arr.ndim == 2 else None
    if out is None:
        raise DataError(f"mask {path} is a colour image; pass a palette (--palette) to decode it")
    if ignore is not None:
        out[ignore] = IGNORE_INDEX
    return torch.from_numpy(out)


def _guess_mode(arr: np.ndarray, pil_mode: str, ignore: np.ndarray | None, path: Path) -> str:
    if arr.ndim == 3:
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


def _decode_palette(arr, palette, ignore_value, path) -> np.ndarray:
    if arr.ndim != 3:
        raise DataError(f"mask {path} is not a colour image but a palette was given; drop --palette")
    if palette is None:
        raise DataError(f"mask {path} is a colour image; pass a palette (--palette) to decode it")
    out = np.full(arr.shape[:2], -1, dtype=np.int64)
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


def pair_files(images: Sequence[Path], others: Sequence[Path], what: str) -> list[Path]:
    """For every image, its ``what`` file: same stem, else same key before the first underscore."""
    by_stem = {p.stem: p for p in others}
    if all(i.stem in by_stem for i in images):
        return [by_stem[i.stem] for i in images]
    by_key: dict[str, Path] = {}
    for p in others:
        by_key.setdefault(p.stem.split("_")[0], p)
    out = []
    for i in images:
        match = by_stem.get(i.stem) or by_key.get(i.stem.split("_")[0])
        if match is None:
            folder = others[0].parent if others else "?"
            raise DataError(f"no {what} for image {i.name} in {folder} (matched by name or by the part "
                            "before the first underscore)")
        out.append(match)
    return out


def load_folder(root: Path, images: str = "images", masks: str = "masks", valid: str | None = None, *,
                mask_mode: str = "auto", palette=None, ignore_value: int | None = None,
                channels: int | None = None, resize_to_mask: bool = True) -> list[SegmentationSample]:
    """Read ``root/images`` with ``root/masks`` (and ``root/valid`` region masks, nonzero = valid).

    Images whose size differs from their mask are resized to the mask (Weizmann horses' ``rgb/``),
    unless ``resize_to_mask`` is False, then it is an error.
    """
    root = Path(root)
    image_files = _files(root / images)
    mask_files = pair_files(image_files, _files(root / masks), "mask")
    valid_files = pair_files(image_files, _files(root / valid), "valid-region mask") if valid else None
    samples = []
    for k, (ip, mp) in enumerate(zip(image_files, mask_files)):
        target = decode_mask(mp, mask_mode, palette, ignore_value)
        h, w = target.shape
        with Image.open(ip) as im:
            size = im.size
        if size != (w, h) and not resize_to_mask:
            raise DataError(f"image {ip.name} is {size[0]}x{size[1]} but its mask is {w}x{h}")
        image = load_image(ip, channels, (w, h))
        if valid_files is not None:
            region = decode_mask(valid_files[k], "binary")
            if region.shape != target.shape:
                raise DataError(f"valid-region mask {valid_files[k].name} is not the size of {mp.name}")
            target[region == 0] = IGNORE_INDEX
        samples.append(SegmentationSample(ip.stem, image, target))
    return samples


def num_classes_of(samples: Sequence[SegmentationSample]) -> int:
    top = max(int(s.target.max()) for s in samples)
    return max(2, top + 1)


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
