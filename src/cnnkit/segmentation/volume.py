"""Volumes for ``cnnkit segment --volume``: reading them, and the slices of the 2.5D mode.

A volume is a multi-page TIFF (each page one Z slice, read with tifffile; grey, or several samples
per pixel as channels) or a folder of 2D slice images in natural name order (``slice2`` before
``slice10``). Images become (C, D, H, W) float32 (8-bit values / 255, 16-bit / 65535, floats as
stored), masks (D, H, W) int64 class indices decoded as 2D masks are (index, binary, palette), the
mode guessed once for the whole volume. A folder of volumes (``--data DIR/images``, ``--masks``)
holds multi-page TIFFs and subfolders of slices; they pair by name as 2D images and masks do.

Two ways to classify a voxel (``--volume``):

- ``3d``: a 3D patch net (Conv3d, MaxPool3d, ...; ``segment3d``) on the P x P x P block around the
  voxel, run densely over the whole volume.
- ``2.5d=K``: a 2D patch net on slice z with its K neighbours on each side as extra channels
  (C * (2K + 1) channels, slice-major: z - K first); slices beyond the first and last are
  replications of them. Each slice is then a 2D image of the ordinary pipeline, predicted one by one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit.errors import ConfigError, DataError
from cnnkit.segmentation.data import (
    _READ_ERRORS,
    IMAGE_KEY_SUFFIXES,
    IMAGE_SUFFIXES,
    MASK_KEY_SUFFIXES,
    SegmentationSample,
    _image_array,
    _read,
    decode_labels,
    mask_array,
    pair_files,
)

VOLUME_SUFFIXES = {".tif", ".tiff"}
VOLUME_MODES = ("3d", "2.5d")


@dataclass(frozen=True)
class VolumeMode:
    """``--volume``: "3d", or "2.5d" with ``context`` neighbouring slices on each side as channels."""

    mode: str
    context: int = 0

    @classmethod
    def parse(cls, spec: str | None) -> VolumeMode | None:
        """``None``/"none" (2D images), "3d", "2.5d" (one neighbour a side) or "2.5d=K"."""
        if spec in (None, "", "none"):
            return None
        mode, sep, value = spec.partition("=")
        if mode == "3d" and not sep:
            return cls("3d")
        if mode == "2.5d" and (not sep or (value.isascii() and value.isdigit() and 0 < int(value) <= 64)):
            return cls("2.5d", int(value) if sep else 1)
        raise ConfigError(f"--volume {spec!r}: write 3d, 2.5d or 2.5d=K (K neighbouring slices a side, 1..64), "
                          "or none for 2D images")

    @classmethod
    def from_meta(cls, meta: dict) -> VolumeMode | None:
        """The mode a checkpoint was trained in (its ``meta["volume"]``; None for 2D images)."""
        v = meta.get("volume")
        return None if v is None else cls(v["mode"], int(v["context"]))

    def meta(self) -> dict:
        return {"mode": self.mode, "context": self.context}

    def spec(self) -> str:
        return "3d" if self.mode == "3d" else f"2.5d={self.context}"

    @property
    def slices(self) -> int:
        """Slices a 2.5D input stacks (1 in 3D: the net sees the volume itself)."""
        return 2 * self.context + 1


def natural_key(path: Path) -> list:
    """Sort key: runs of digits compare as numbers (``slice2`` < ``slice10``), the rest case-blind."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", path.name) if t]


# --------------------------------------------------------------------------- finding volumes


def volume_paths(folder: Path, what: str = "image") -> list[Path]:
    """The volumes in ``folder``: its multi-page TIFFs and its subfolders of slices, in natural order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder {folder} does not exist; give the folder that holds the {what} volumes")
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=natural_key)
    flat = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES - VOLUME_SUFFIXES]
    if flat:
        raise DataError(f"{folder} holds 2D {what}s ({flat[0].name}, ...) but each entry of a folder of volumes is "
                        "a multi-page TIFF or a subfolder of slices; move each volume's slices into a subfolder, "
                        "or give the folder that holds the volume's folder")
    volumes = [p for p in entries if p.is_dir() or (p.is_file() and p.suffix.lower() in VOLUME_SUFFIXES)]
    if not volumes:
        raise DataError(f"no {what} volumes (multi-page .tif/.tiff files or subfolders of slices) in {folder}")
    return volumes


def volume_items(items: Sequence[str | Path], what: str = "image") -> list[Path]:
    """Volumes given as TIFF files, folders of volumes, or a folder of slices (``cnnkit segment predict
    --images``): a folder with no subfolder whose files are all single-page 2D images is one volume."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir() and _is_slice_folder(p):
            paths.append(p)
        elif p.is_dir():
            paths += volume_paths(p, what)
        elif p.is_file():
            if p.suffix.lower() not in VOLUME_SUFFIXES:
                raise DataError(f"{p} is not a multi-page TIFF; give volumes as .tif/.tiff files or folders of them")
            paths.append(p)
        else:
            raise DataError(f"{p} is neither a volume (.tif/.tiff) nor a folder; check the path")
    return paths


def _is_slice_folder(folder: Path) -> bool:
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not entries or any(p.is_dir() for p in entries):
        return False
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    return bool(images) and all(_pages(p) == 1 for p in images if p.suffix.lower() in VOLUME_SUFFIXES)


def _pages(path: Path) -> int:
    """A TIFF's page count; 0 where it cannot be read (reading it later names the problem)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.pages)
    except (*_READ_ERRORS, tifffile.TiffFileError):
        return 0


def _slice_files(folder: Path, what: str) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
    if not files:
        raise DataError(f"{what} volume folder {folder} holds no slice images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                        "put the volume's slices in it, or remove it")
    return files


# --------------------------------------------------------------------------- reading


def _size(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _same_size(arrays: list[np.ndarray], names: list[str], source: Path, what: str, unit: str) -> np.ndarray:
    """Stack 2D arrays (H, W[, S]) into (D, H, W[, S]), or one line naming the first that differs."""
    for a, name in zip(arrays[1:], names[1:]):
        if a.shape != arrays[0].shape:
            raise DataError(f"{what} volume {source}: {unit} {name} is {_size(a.shape)} but {unit} {names[0]} is "
                            f"{_size(arrays[0].shape)}; every slice of a volume must have one size and channel count")
    return np.stack(arrays)


def _tiff_pages(path: Path, what: str) -> tuple[np.ndarray, bool]:
    """(D, H, W[, S]) stored values of a multi-page TIFF, and whether its pages are palette images."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages, palette = [], True
            for page in tif.pages:
                arr = page.asarray()
                if page.axes == "SYX":  # planar samples
                    arr = np.moveaxis(arr, 0, -1)
                elif page.axes not in ("YX", "YXS"):
                    raise DataError(f"{what} volume {path}: page {len(pages) + 1} has axes {page.axes}, not one "
                                    "2D slice; save one slice per page (grey or RGB)")
                pages.append(arr)
                palette &= page.photometric == tifffile.PHOTOMETRIC.PALETTE
    except (*_READ_ERRORS, tifffile.TiffFileError, MemoryError) as exc:
        reason = str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__
        raise DataError(f"cannot read {what} volume {path}: {reason}; re-save it as a multi-page TIFF, "
                        "or remove it") from None
    if not pages:
        raise DataError(f"{what} volume {path} has no pages; re-save it as a multi-page TIFF, or remove it")
    return _same_size(pages, [str(i) for i in range(1, len(pages) + 1)], path, what, "page"), palette


def _to_unit(arr: np.ndarray) -> np.ndarray:
    """Stored values -> float32 as 2D images are read: 8-bit / 255, 16-bit / 65535, others as stored."""
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype, 1.0)
    return arr.astype(np.float32) / np.float32(scale)


def load_volume(path: Path) -> torch.Tensor:
    """(C, D, H, W) float32: a multi-page TIFF or a folder of slice images (see the module doc)."""
    path = Path(path)
    if path.is_dir():
        files = _slice_files(path, "image")
        slices = [_one_page(f, "image", lambda im: _image_array(im, None)) for f in files]
        return torch.from_numpy(np.ascontiguousarray(
            _same_size(slices, [f.name for f in files], path, "image", "slice").transpose(1, 0, 2, 3)))
    arr, _ = _tiff_pages(path, "image")
    arr = _to_unit(arr)
    if arr.ndim == 3:
        arr = arr[..., None]  # (D, H, W, 1)
    if arr.shape[-1] in (2, 4):  # grey + alpha, RGB + alpha: the alpha channel is dropped, as for 2D images
        arr = arr[..., : arr.shape[-1] - 1]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(3, 0, 1, 2)))


def load_mask_volume(path: Path, mode: str = "auto", palette=None, ignore_value: int | None = None) -> torch.Tensor:
    """(D, H, W) int64 class indices of a mask volume (TIFF or folder of mask slices)."""
    path = Path(path)
    if path.is_dir():
        files = _slice_files(path, "mask")
        read = [_one_page(f, "mask", lambda im: mask_array(im, mode)) for f in files]
        arr = _same_size([a for a, _ in read], [f.name for f in files], path, "mask", "slice")
        is_palette = all(m == "P" for _, m in read)
    else:
        arr, is_palette = _tiff_pages(path, "mask")
    return decode_labels(arr, "P" if is_palette else "", path, mode, palette, ignore_value, spatial=3)


def _one_page(path: Path, what: str, to_array):
    """``to_array`` of a slice file, refusing a multi-page file (a volume where a slice belongs)."""
    def read(im):
        if getattr(im, "n_frames", 1) > 1:
            raise DataError(f"{what} slice {path} has {im.n_frames} pages but a folder of slices holds one 2D "
                            "image per file; give a multi-page TIFF as a volume of its own")
        return to_array(im)
    return _read(path, what, read)


def load_volume_folder(root: Path, images: str = "images", masks: str = "masks", *, mask_mode: str = "auto",
                       palette=None, ignore_value: int | None = None, skip_unpaired: bool = False,
                       mask_suffix: str | None = None, image_suffix: str | None = None
                       ) -> list[SegmentationSample]:
    """``root/images`` volumes with their ``root/masks`` volumes, paired by name as 2D files are."""
    root = Path(root)
    image_paths = volume_paths(root / images, "image")
    pairs, _ = pair_files(image_paths, volume_paths(root / masks, "mask"), "mask volume",
                          suffixes=(mask_suffix,) if mask_suffix else MASK_KEY_SUFFIXES,
                          image_suffixes=(image_suffix,) if image_suffix else IMAGE_KEY_SUFFIXES,
                          skip_unpaired=skip_unpaired)
    samples = []
    for ip, mp in pairs:
        image = load_volume(ip)
        target = load_mask_volume(mp, mask_mode, palette, ignore_value)
        check_mask_shape(target, mp, image, ip)
        samples.append(SegmentationSample(ip.stem if ip.is_file() else ip.name, image, target, None, mp))
    return samples


def check_mask_shape(target: torch.Tensor, mask: Path, image: torch.Tensor, image_path: Path) -> None:
    if tuple(target.shape) != tuple(image.shape[1:]):
        raise DataError(f"mask volume {mask} is {_size(target.shape)} (slices x height x width) but image volume "
                        f"{image_path.name} is {_size(image.shape[1:])}; pass the mask made for this volume")


# --------------------------------------------------------------------------- 2.5D


def context_stack(volume: torch.Tensor, z: int, k: int) -> torch.Tensor:
    """(C, D, H, W) -> (C * (2k + 1), H, W): slices z - k .. z + k, the first and last replicated
    beyond the volume; channels slice-major (the C channels of slice z - k first)."""
    d = volume.shape[1]
    idx = [min(max(z + o, 0), d - 1) for o in range(-k, k + 1)]
    return volume[:, idx].transpose(0, 1).reshape(-1, *volume.shape[2:])  # (2k+1, C, H, W) -> (.., H, W)


def slice_samples(samples: Sequence[SegmentationSample], k: int) -> list[SegmentationSample]:
    """Every slice of every volume as a 2D sample with its ``k`` neighbours a side as channels."""
    return [SegmentationSample(f"{s.name}_z{z:04d}", context_stack(s.image, z, k), s.target[z], None, s.mask_file)
            for s in samples for z in range(s.image.shape[1])]


def volume_probabilities(segmenter, volume: torch.Tensor) -> torch.Tensor:
    """(K, D, H, W) class probabilities of a (C, D, H, W) volume from a ``Segmenter`` of a volume
    checkpoint: one dense 3D pass, or in 2.5D one 2D pass per slice stack."""
    mode = VolumeMode.from_meta(segmenter.meta)
    if mode.mode == "3d":
        return segmenter.probabilities(volume)
    return torch.stack([segmenter.probabilities(context_stack(volume, z, mode.context))
                        for z in range(volume.shape[1])], dim=1)
