"""CIFAR-10 "python version" batches, unpickled without ever running code from the file.

The batches (Krizhevsky 2009) are pickles of dicts: b'data' (N, 3072) uint8 holding the red, green
then blue 32 x 32 planes of each image, b'labels' a list of ints; batches.meta has b'label_names'.
A pickle can name any importable callable and have it called; :class:`SafeUnpickler` resolves only
the few NumPy names an array needs and refuses every other name before anything is called.
"""

from __future__ import annotations

import _codecs
import pickle
from pathlib import Path

import numpy as np

from cnnkit.errors import DataError

try:  # NumPy >= 2 moved the module; pickles written by either version name one of the two
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct, scalar

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): scalar,
    ("numpy._core.multiarray", "scalar"): scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 writes bytes objects as _codecs.encode(str, 'latin1') under protocol 2.
    ("_codecs", "encode"): _codecs.encode,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, bytes, numbers and NumPy arrays; refuses any other global."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id")


def safe_load(path: Path):
    """Unpickle ``path`` with :class:`SafeUnpickler` (Python 2 strings read as bytes, as CIFAR needs)."""
    try:
        with open(path, "rb") as fh:
            return SafeUnpickler(fh, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}); check the file's permissions") from None
    except Exception as exc:  # a hostile or corrupt pickle can raise nearly anything while parsing
        raise DataError(f"{path} is not a CIFAR batch that can be loaded safely ({exc}); "
                        f"download the CIFAR-10 python version again") from None


def find_cifar_folder(root: Path) -> Path | None:
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file():
            return folder
    return None


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_load(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch dict; "
                        f"download the CIFAR-10 python version again")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a (N, 3072) uint8 array; this is not a CIFAR-10 batch")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' must be a list of integers; this is not a CIFAR-10 batch"
                        ) from None
    if labels.shape != (len(data),):
        raise DataError(f"{path} has {len(data)} images but {labels.size} labels; download it again")
    return data.reshape(-1, 3, 32, 32), labels  # (N, 3072) -> (N, 3, 32, 32): R, G, B planes


def load_cifar_arrays(folder: Path) -> dict:
    """data_batch_1..k as train, test_batch (when present) as val, class names from batches.meta."""
    train_paths = sorted(folder.glob("data_batch_*"), key=lambda p: (len(p.name), p.name))
    parts = [_read_batch(p) for p in train_paths]
    train = (np.concatenate([d for d, _ in parts]), np.concatenate([lab for _, lab in parts]))
    val = _read_batch(folder / "test_batch") if (folder / "test_batch").is_file() else None
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        meta = safe_load(meta_path)
        names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if not isinstance(names, list):
            raise DataError(f"{meta_path} has no 'label_names' list; download CIFAR-10 again")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    else:
        classes = list(CIFAR10_CLASSES)
    for split, name in ((train, "data_batch_*"), (val, "test_batch")):
        labels = split[1] if split is not None else np.zeros(0)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"{folder / name} has labels outside 0..{len(classes) - 1}; "
                            f"the batches and batches.meta do not match")
    return {"train": train, "val": val, "classes": classes, "name": "CIFAR-10"}
