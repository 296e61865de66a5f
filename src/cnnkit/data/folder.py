"""Class-folder image datasets (``root/<class>/<image>``), decoded lazily with Pillow.

Every file is checked once up front, so a corrupt file stops the run before training starts rather
than in the middle of epoch 3 inside a DataLoader worker.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm import tqdm

from cnnkit.data.common import check_channels, check_size
from cnnkit.data.images import open_image
from cnnkit.errors import CnnkitError, DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".gif", ".bmp", ".webp")
IGNORED_FOLDERS = {"__MACOSX"}  # macOS zip resource forks, never a class

# Valid images that are not samples: stand-ins a web host served instead of the photo. Keyed by
# (file size, SHA-256) so that only files of exactly these sizes are ever hashed.
KNOWN_PLACEHOLDERS = {
    (5504, "6b4966252973c581b521f804453c6a0649ea6a2ce7e3e5c7deeb7d80623de231"):
        "a web placeholder reading 'we're sorry, this image could not be found' "
        "(hymenoptera's imageNotFound.gif)",
}
_PLACEHOLDER_SIZES = {size for size, _ in KNOWN_PLACEHOLDERS}


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def subfolders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not is_hidden(p) and p.name not in IGNORED_FOLDERS)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path) and path.is_file()


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted; hidden entries and other files ignored."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink back up the tree: os.walk would follow it forever
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(Path(dirpath) / f))
    return found


def find_classes(root: Path) -> dict[str, list[Path]]:
    """{class name: image paths} for the class folders of ``root``; errors name what is missing."""
    folders = subfolders(root)
    if not folders:
        raise DataError(f"{root} has no class subfolders; put each class's images in {root}/<class>/")
    classes = {}
    for folder in folders:
        files = image_files(folder)
        if not files:
            raise DataError(f"class folder {folder} has no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"add images or remove the folder")
        classes[folder.name] = files
    loose = [p for p in root.iterdir() if is_image_file(p)]
    if loose:
        logger.warning("%d image file(s) directly in %s are not in a class folder and are ignored",
                       len(loose), root)
    return classes


def check_image(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it decodes.

    ``verify()`` checks structure (for PNG every chunk CRC) but not that the pixel data is complete,
    so the other formats are also decoded; JPEG at 1/8 scale, which still reads the whole stream.
    """
    try:
        if os.path.getsize(path) in _PLACEHOLDER_SIZES:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            reason = KNOWN_PLACEHOLDERS.get((os.path.getsize(path), digest))
            if reason:
                return reason
        with open_image(path) as image:
            kind = image.format
            image.verify()
        if kind != "PNG":
            with open_image(path) as image:
                if kind == "JPEG":
                    image.draft(image.mode, (1, 1))
                image.load()
    except DataError as exc:  # too many pixels
        return str(exc)
    except CnnkitError:  # a bad setting, not a bad file
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        return f"{type(exc).__name__}: {exc}"
    return None


def scan_images(paths: list[Path], skip_bad_files: bool, where: Path) -> list[bool]:
    """Check every file (threads: Pillow releases the GIL while decoding); True marks a good one."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        reasons = list(tqdm(pool.map(check_image, paths), total=len(paths), desc="checking images",
                            leave=False, disable=not sys.stderr.isatty()))
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if bad and not skip_bad_files:
        path, reason = bad[0]
        more = f" ({len(bad)} bad files in {where} in total)" if len(bad) > 1 else ""
        raise DataError(f"bad image file {path}: {reason}{more}; "
                        f"delete it or use --skip-bad-files to skip it")
    if bad:
        listing = "; ".join(f"{p} ({r})" for p, r in bad[:20]) + (" ..." if len(bad) > 20 else "")
        logger.warning("skipped %d bad image file(s) in %s: %s", len(bad), where, listing)
    return [r is None for r in reasons]


def load_image(path: str | Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Decode one file to float32 (channels, H, W) in [0, 1].

    Palette and alpha images are composited onto black (premultiplied alpha: a fully transparent
    pixel is 0 whatever colour it stores); 16-bit images keep their precision (Pillow's own
    'I;16' -> 'L' conversion clips instead of scaling); EXIF orientation is applied.
    """
    height, width = size
    try:
        with open_image(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                array = np.asarray(image, dtype=np.float32)
                array = array if image.mode == "F" else array / 65535.0
                plane = Image.fromarray(np.clip(array, 0, 1)).resize((width, height), Image.BILINEAR)
                pixels = torch.from_numpy(np.array(plane))[None]  # (1, H, W)
            else:
                if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
                    image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)),
                                                  image.convert("RGBA"))
                if image.mode not in ("L", "RGB"):
                    image = image.convert("RGB")
                if channels == 1 and image.mode == "RGB":
                    image = image.convert("L")  # 601-2 luma, as common.rgb_to_luma
                image = image.resize((width, height), Image.BILINEAR)
                pixels = torch.from_numpy(np.array(image)).float().div_(255)
                # (H, W) -> (1, H, W); (H, W, C) -> (C, H, W)
                pixels = pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)
    except CnnkitError:
        raise
    except Exception as exc:
        raise DataError(f"cannot decode image {path} ({type(exc).__name__}: {exc}); "
                        f"delete it or re-save it") from None
    if pixels.shape[0] != channels:  # gray file, RGB asked: replicate after the (cheaper) 1-plane resize
        pixels = pixels.repeat(channels, 1, 1)
    return pixels.contiguous()


class FolderDataset(Dataset):
    """Images in ``root/<class>/...`` (any depth below the class folder), decoded per item.

    ``classes`` fixes the class list and order (e.g. a val folder takes the train folder's list);
    by default it is the sorted folder names. ``.paths``, ``.labels`` (int64 tensor), ``.classes``.
    Items are ``(float32 (channels, H, W) in [0, 1], int label)``.
    """

    def __init__(self, root: str | Path, size: tuple[int, int], *, channels: int = 3,
                 classes: list[str] | None = None, skip_bad_files: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist; check the path")
        self.size = check_size(size)
        self.channels = check_channels(channels)
        found = find_classes(self.root)
        if classes is None:
            classes = sorted(found)
            if len(classes) < 2:
                raise DataError(f"{self.root} has a single class folder ({classes[0]}); classification "
                                f"needs at least 2 classes, one subfolder each")
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{self.root} has class folder(s) {', '.join(unknown)} that the training set "
                            f"lacks ({', '.join(classes)}); add them to train or remove them")
        self.classes = list(classes)
        index = {name: i for i, name in enumerate(self.classes)}
        paths = [p for name in sorted(found) for p in found[name]]
        labels = [index[name] for name in sorted(found) for _ in found[name]]
        good = scan_images(paths, skip_bad_files, self.root)
        self.paths = [p for p, ok in zip(paths, good) if ok]
        self.labels = torch.tensor([lab for lab, ok in zip(labels, good) if ok], dtype=torch.long)
        counts = torch.bincount(self.labels, minlength=len(self.classes))
        for name in found:
            if counts[index[name]] == 0:
                raise DataError(f"class folder {self.root / name} has no usable images after skipping bad "
                                f"files; add images or remove the folder")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return load_image(self.paths[index], self.channels, self.size), int(self.labels[index])

    def subset(self, indices) -> FolderDataset:
        """A FolderDataset over the given items, without scanning the files again."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        new = FolderDataset.__new__(FolderDataset)
        new.root, new.size, new.channels = self.root, self.size, self.channels
        new.classes = list(self.classes)
        new.paths = [self.paths[i] for i in indices.tolist()]
        new.labels = self.labels[indices]
        return new


def is_class_tree(folder: Path) -> bool:
    return folder.is_dir() and bool(subfolders(folder))
