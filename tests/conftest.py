"""Project-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests run small networks and many tiny float64 ops. With two intra-op threads on a 2-core
    machine that other jobs share, OpenMP synchronisation costs far more than the ops (measured: the
    layer tests took 111 s with 2 threads and 13 s with 1). Each torchrun process likewise runs with
    OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_tiny_idx(folder, per_class=12, val_per_class=5):
    """A small MNIST-format copy of scikit-learn's digits (its own t10k split), fast to train on."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    train, val = [], []
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        train += idx[:per_class].tolist()
        val += idx[per_class:per_class + val_per_class].tolist()
    for prefix, idx in (("train", train), ("t10k", val)):
        images = np.clip(digits.images[idx] * 16, 0, 255).astype(np.uint8)  # (N, 8, 8)
        labels = digits.target[idx].astype(np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + np.array(images.shape, ">u4").tobytes() + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + np.array(labels.shape, ">u4").tobytes() + labels.tobytes())
    return str(folder)


@pytest.fixture
def tiny_idx():
    """``tiny_idx(folder, per_class, val_per_class)`` writes a tiny MNIST IDX dataset, returns its path."""
    return _write_tiny_idx
