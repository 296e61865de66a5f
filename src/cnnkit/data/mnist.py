"""MNIST-style IDX files (MNIST, Fashion-MNIST, KMNIST), parsed with NumPy.

IDX format (LeCun et al.): 2 zero bytes, a type code, the number of dimensions n, then n big-endian
uint32 sizes, then the values big-endian in C order. Files may be raw or gzip-compressed.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from cnnkit.errors import DataError

IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or .gz); every header field and the length are checked."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path} ({exc}); download it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'}); "
                        f"expected MNIST-format train/t10k -images/-labels files")
    dtype, n = IDX_DTYPES[data[2]], data[3]
    if ndim is not None and n != ndim:
        raise DataError(f"{path} has {n} dimensions, expected {ndim}; "
                        f"are the images and labels files swapped?")
    header = 4 + 4 * n
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its header; download it again")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=n, offset=4))
    if 0 in dims:
        raise DataError(f"{path} holds no data (its header gives dimensions {dims}); download it again")
    expected = header + math.prod(dims) * dtype.itemsize  # Python ints: 2^32-sized dims must not wrap around
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(f"{path} is {what} ({len(data)} bytes, header {dims} needs {expected}); "
                        f"download it again")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    # Mirrors spell the names 'train-images-idx3-ubyte' or 'train-images.idx3-ubyte'; raw before .gz.
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_idx_folder(root: Path) -> Path | None:
    """The folder holding the train IDX files: ``root`` itself or ``root/raw`` (torchvision's layout)."""
    for folder in (root, root / "raw"):
        if _find(folder, "train-images-idx3-ubyte") or _find(folder, "train-labels-idx1-ubyte"):
            return folder
    return None


def _load_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    images_path = _find(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(folder, f"{prefix}-labels-idx1-ubyte")
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        missing = f"{prefix}-images-idx3-ubyte" if images_path is None else f"{prefix}-labels-idx1-ubyte"
        raise DataError(f"{folder} has {(images_path or labels_path).name} but no {missing}[.gz]; "
                        f"add the missing file")
    images, labels = read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DataError(f"{images_path} / {labels_path} must hold uint8 values (MNIST format)")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
                        f"labels; the files belong to different sets")
    return images[:, None], labels.astype(np.int64)  # (N, 1, H, W)


def load_idx_arrays(folder: Path) -> dict:
    """Train (and t10k, when present) arrays from an IDX folder, plus class names."""
    train = _load_pair(folder, "train")
    if train is None:
        raise DataError(f"{folder} has no train-images-idx3-ubyte[.gz]; expected MNIST-format files")
    val = _load_pair(folder, "t10k")
    num_classes = int(max(train[1].max(), val[1].max() if val is not None else 0)) + 1
    # Fashion-MNIST ships under the same file names; its folder name is the only hint.
    near = folder.resolve().parts[-2:]
    fashion = num_classes == 10 and any("fashion" in part.lower() for part in near)
    classes = FASHION_CLASSES if fashion else [str(i) for i in range(num_classes)]
    return {"train": train, "val": val, "classes": classes, "name": "Fashion-MNIST" if fashion else "MNIST"}
