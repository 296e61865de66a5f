"""Classification datasets: every source written as tiny files in tmp_path, checked against naive twins."""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, Subset

import cnnkit.data.common as common
import cnnkit.data.folder as folder_module
from cnnkit.data import (
    ArrayDataset,
    FolderDataset,
    Splits,
    compute_mean_image,
    labels_of,
    load_dataset,
    stratified_split,
)
from cnnkit.data.cifar import SafeUnpickler, safe_load
from cnnkit.data.mnist import read_idx
from cnnkit.errors import ConfigError, DataError

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------- file writers (tiny, deterministic)

def write_idx(path: Path, array: np.ndarray, truncate: int = 0) -> Path:
    codes = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)  # sizes, big-endian uint32
    data = header + array.tobytes()
    data = data[: len(data) - truncate]
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def make_mnist(folder: Path, n_train=30, n_test=10, side=28, gz=False, test=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)) if test else (("train", n_train),):
        images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        arrays[prefix] = (images, labels)
    return arrays


def cifar_batch(n, seed, protocol=2):
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"batch", b"labels": [int(i % 10) for i in range(n)],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
    return batch, pickle.dumps(batch, protocol=protocol)


def make_cifar(folder: Path, batches=2, n=12, protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(batches):
        batch, data = cifar_batch(n, seed=i, protocol=protocol)
        (folder / f"data_batch_{i + 1}").write_bytes(data)
        written.append(batch)
    test, data = cifar_batch(n // 2, seed=99, protocol=protocol)
    (folder / "test_batch").write_bytes(data)
    names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol))
    return written, test


def rgb(seed, h=12, w=10):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_folder_tree(root: Path, per_class=4, classes=("cat", "dog", "emu")) -> Path:
    """PNG, JPEG, TIFF and GIF files in class folders, plus files that must be ignored."""
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            ext = ("png", "jpg", "tif", "gif")[i % 4]
            Image.fromarray(rgb(10 * c + i)).save(folder / f"img{i}.{ext}")
        (folder / ".DS_Store").write_bytes(b"\x00\x01junk")
        (folder / "notes.txt").write_text("not an image")
    return root


def naive_mean(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0].double() for i in range(len(dataset))]).mean(0)


# ---------------------------------------------------------------- digits and splits

def test_digits_shapes_counts_range():
    splits = load_dataset("digits", (32, 32))
    assert isinstance(splits, Splits)
    assert len(splits.train) + len(splits.val) == 1797
    assert (len(splits.train), len(splits.val)) == (1438, 359)  # sum over classes of round(0.2 * n_c)
    assert splits.classes == [str(i) for i in range(10)] and splits.channels == 1
    assert splits.description == "digits (sklearn): 1438 train / 359 val (seed 0), 10 classes, 8x8 -> 32x32"
    image, label = splits.train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    stack = splits.train.images
    assert stack.dtype == torch.float32 and stack.min() >= 0 and stack.max() <= 1 and stack.max() > 0.9


def test_digits_resize_matches_per_image_interpolate():
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = torch.from_numpy(digits.images / 16.0).float()[:, None]  # (1797, 1, 8, 8)
    splits = load_dataset("digits", (20, 24), channels=3, val_fraction=0.25, seed=3)
    _, val_idx = stratified_split(torch.from_numpy(digits.target), 0.25, 3)
    for j in (0, 7, len(val_idx) - 1):
        expected = F.interpolate(raw[val_idx[j]][None], size=(20, 24), mode="bilinear", antialias=True)[0]
        image, label = splits.val[j]
        assert image.shape == (3, 20, 24)
        torch.testing.assert_close(image, expected.clamp(0, 1).expand(3, -1, -1))
        assert label == int(digits.target[val_idx[j]])


def test_split_is_deterministic_stratified_and_disjoint():
    labels = torch.tensor([0] * 50 + [1] * 7 + [2] * 2 + [3] * 1 + [4] * 13)[torch.randperm(73)]
    train, val = stratified_split(labels, 0.2, seed=5)
    again = stratified_split(labels, 0.2, seed=5)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    other = stratified_split(labels, 0.2, seed=6)
    assert not torch.equal(val, other[1])
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(73))
    counts = torch.bincount(labels[val], minlength=5).tolist()
    assert counts == [10, 1, 1, 0, 3]  # round(.2*50)=10, round(1.4)=1, at least 1 of 2, 0 of 1, round(2.6)=3
    empty_train, empty_val = stratified_split(labels, 0.0, seed=0)
    assert len(empty_val) == 0 and len(empty_train) == 73
    with pytest.raises(ConfigError):
        stratified_split(labels, 1.0, seed=0)


def test_split_rounds_half_up():
    train, val = stratified_split(torch.tensor([0] * 5 + [1] * 15), 0.5, seed=0)
    assert torch.bincount(torch.tensor([0] * 5 + [1] * 15)[val]).tolist() == [3, 8]


# ---------------------------------------------------------------- ArrayDataset

def test_array_dataset_uint8_resize_matches_naive_and_chunks(monkeypatch):
    monkeypatch.setattr(common, "_RESIZE_CHUNK", 3)
    images = torch.randint(0, 256, (7, 3, 9, 11), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    dataset = ArrayDataset(images, labels, ["a", "b"], (5, 6))
    assert dataset.images.dtype == torch.uint8
    for i in range(7):
        naive = F.interpolate(images[i : i + 1].float(), size=(5, 6), mode="bilinear", antialias=True)[0]
        torch.testing.assert_close(dataset[i][0], naive.round().clamp(0, 255) / 255)
        assert dataset[i][1] == int(labels[i])


def test_array_dataset_channel_conversion():
    images = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    gray = ArrayDataset(images, torch.zeros(4, dtype=torch.long), ["a"], channels=1)
    for i in range(4):
        pil = np.asarray(Image.fromarray(images[i].permute(1, 2, 0).numpy()).convert("L"))
        assert np.abs(gray[i][0][0].numpy() * 255 - pil).max() <= 1  # Pillow's 601-2 luma, integer-rounded
    replicated = ArrayDataset(images[:, :1], torch.zeros(4, dtype=torch.long), ["a"], channels=3)
    image, _ = replicated[2]
    assert image.shape == (3, 6, 6) and torch.equal(image[0], image[2])
    assert torch.equal(image[1], images[2, 0] / 255)
    image.add_(1)  # items are independent tensors: in-place augmentation must not touch the store
    assert torch.equal(replicated[2][0][0], images[2, 0] / 255)


def test_array_dataset_rejects_bad_input():
    with pytest.raises(DataError, match="labels must lie"):
        ArrayDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 2]), ["a", "b"])
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        ArrayDataset(torch.full((2, 1, 4, 4), 3.0), torch.tensor([0, 1]), ["a", "b"])
    with pytest.raises(DataError, match="channels"):
        ArrayDataset(torch.zeros(2, 2, 4, 4), torch.tensor([0, 1]), ["a", "b"])
    with pytest.raises(ConfigError):
        load_dataset("digits", (0, 32))
    with pytest.raises(ConfigError):
        load_dataset("digits", (32, 32), channels=2)


# ---------------------------------------------------------------- MNIST IDX

@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_raw_and_gz(tmp_path, gz):
    arrays = make_mnist(tmp_path / "mnist", gz=gz)
    splits = load_dataset(str(tmp_path / "mnist"), (28, 28))
    assert (len(splits.train), len(splits.val), splits.channels) == (30, 10, 1)
    assert splits.classes == [str(i) for i in range(10)]
    assert "30 train / 10 val (the set's own test split)" in splits.description
    image, label = splits.val[4]
    assert torch.equal(image[0], torch.from_numpy(arrays["t10k"][0][4]).float() / 255)
    assert label == int(arrays["t10k"][1][4])


def test_mnist_without_test_files_is_split_and_fashion_names(tmp_path):
    make_mnist(tmp_path / "fashion-mnist" / "raw", n_train=40, test=False)
    splits = load_dataset(str(tmp_path / "fashion-mnist"), (32, 32), channels=3)
    assert (len(splits.train), len(splits.val)) == (30, 10)  # 4 per class: round(0.8) = 1 each
    assert splits.classes[0] == "T-shirt/top" and splits.train[0][0].shape == (3, 32, 32)
    assert "28x28 -> 32x32, 1 -> 3 channels" in splits.description


def test_idx_errors_name_the_file(tmp_path):
    good = write_idx(tmp_path / "ok-idx3-ubyte", np.zeros((2, 3, 4), np.uint8))
    assert read_idx(good).shape == (2, 3, 4)
    truncated = write_idx(tmp_path / "cut-idx3-ubyte.gz", np.zeros((2, 3, 4), np.uint8), truncate=5)
    with pytest.raises(DataError, match=r"cut-idx3-ubyte\.gz is truncated"):
        read_idx(truncated)
    bad_magic = tmp_path / "magic-idx1-ubyte"
    bad_magic.write_bytes(b"\x08\x03\x00\x01" + bytes(8))
    with pytest.raises(DataError, match="magic-idx1-ubyte is not an IDX file"):
        read_idx(bad_magic)
    (tmp_path / "broken.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="broken.gz"):
        read_idx(tmp_path / "broken.gz")


def test_mnist_folder_errors(tmp_path):
    make_mnist(tmp_path / "m")
    write_idx(tmp_path / "m" / "t10k-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="10 images but .*t10k-labels-idx1-ubyte has 9"):
        load_dataset(str(tmp_path / "m"), (28, 28))
    (tmp_path / "m" / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no train-labels-idx1-ubyte"):
        load_dataset(str(tmp_path / "m"), (28, 28))
    write_idx(tmp_path / "m" / "train-labels-idx1-ubyte", np.zeros((30, 2), np.uint8))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte has 2 dimensions"):
        load_dataset(str(tmp_path / "m"), (28, 28))


# ---------------------------------------------------------------- CIFAR-10

@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_batches(tmp_path, protocol):
    written, test = make_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    splits = load_dataset(str(tmp_path), (32, 32))
    assert (len(splits.train), len(splits.val), splits.channels) == (24, 6, 3)
    assert splits.classes[:2] == ["plane", "car"]
    image, label = splits.train[12 + 5]  # batch 2, item 5
    planes = written[1][b"data"][5].reshape(3, 32, 32)  # R, G, B planes of 1024 bytes each
    assert torch.equal(image, torch.from_numpy(planes).float() / 255)
    assert label == written[1][b"labels"][5]
    assert torch.equal(splits.val[3][0], torch.from_numpy(test[b"data"][3].reshape(3, 32, 32)).float() / 255)
    gray = load_dataset(str(tmp_path), (16, 16), channels=1)
    assert gray.train[0][0].shape == (1, 16, 16) and gray.train.images.dtype == torch.uint8


class _Payload:
    """Unpickling this calls open(path, 'w'): creating the file proves that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    folder = tmp_path / "cifar"
    make_cifar(folder)
    marker = tmp_path / "pwned"
    payload = {b"data": _Payload(marker), b"labels": [0]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2 is not a CIFAR batch that can be loaded safely"):
        load_dataset(str(folder), (32, 32))
    assert not marker.exists()
    # The same bytes through plain pickle do run the payload: the test above is not vacuous.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()


def test_safe_unpickler_refuses_globals_but_reads_arrays(tmp_path):
    path = tmp_path / "x.pkl"
    array = np.arange(6, dtype=np.float64).reshape(2, 3)
    path.write_bytes(pickle.dumps({"a": array, "b": [np.int64(3)], "c": b"\x00"}, protocol=4))
    loaded = safe_load(path)
    assert np.array_equal(loaded["a"], array) and loaded["b"][0] == 3
    with open(path, "rb") as fh, pytest.raises(pickle.UnpicklingError, match="os.system"):
        SafeUnpickler(fh).find_class("os", "system")
    path.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    with pytest.raises(DataError, match="refusing to load os.system"):
        safe_load(path)


# ---------------------------------------------------------------- class folders

def test_folder_formats_and_values(tmp_path):
    root = tmp_path / "pets"
    make_folder_tree(root, per_class=4, classes=("cat", "dog"))
    palette = Image.fromarray(rgb(7)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.save(root / "cat" / "palette.gif")
    sixteen = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(sixteen).save(root / "dog" / "deep.png")
    rgba = np.dstack([rgb(8), np.tile(np.array([0, 128, 255], np.uint8), 40).reshape(12, 10)])
    Image.fromarray(rgba, "RGBA").save(root / "dog" / "alpha.png")

    dataset = FolderDataset(root, (12, 10))
    assert dataset.classes == ["cat", "dog"]
    assert len(dataset) == 11 and labels_of(dataset).tolist() == [0] * 5 + [1] * 6
    assert not any(p.name in (".DS_Store", "notes.txt") for p in dataset.paths)
    by_name = {(p.parent.name, p.name): i for i, p in enumerate(dataset.paths)}

    image, label = dataset[by_name[("cat", "img0.png")]]
    assert label == 0 and image.dtype == torch.float32 and image.shape == (3, 12, 10)
    assert torch.equal(image, torch.from_numpy(rgb(0)).permute(2, 0, 1).float() / 255)
    tif, _ = dataset[by_name[("cat", "img2.tif")]]
    assert torch.equal(tif, torch.from_numpy(rgb(2)).permute(2, 0, 1).float() / 255)
    jpg, _ = dataset[by_name[("cat", "img1.jpg")]]
    decoded = np.array(Image.open(root / "cat" / "img1.jpg"))  # lossy: compare with Pillow's own decode
    assert torch.equal(jpg, torch.from_numpy(decoded).permute(2, 0, 1).float() / 255)
    gif, _ = dataset[by_name[("cat", "palette.gif")]]
    lut = np.array(palette.getpalette()[:24], np.uint8).reshape(8, 3)
    assert torch.equal(gif, torch.from_numpy(lut[np.asarray(palette)]).permute(2, 0, 1).float() / 255)
    deep, _ = dataset[by_name[("dog", "deep.png")]]
    torch.testing.assert_close(deep, torch.from_numpy(sixteen / 65535.0).float().expand(3, -1, -1))
    alpha, _ = dataset[by_name[("dog", "alpha.png")]]
    premultiplied = rgb(8).astype(np.float64) * rgba[..., 3:] / 255 / 255
    assert np.abs(alpha.permute(1, 2, 0).numpy() - premultiplied).max() <= 1 / 255 + 1e-6

    gray = FolderDataset(root, (6, 5), channels=1)
    image, _ = gray[by_name[("cat", "img0.png")]]
    expected = Image.fromarray(rgb(0)).convert("L").resize((5, 6), Image.BILINEAR)
    assert image.shape == (1, 6, 5)
    assert torch.equal(image[0], torch.from_numpy(np.array(expected)).float() / 255)
    deep_small, _ = gray[by_name[("dog", "deep.png")]]
    naive = F.interpolate(deep[None, :1].double(), size=(6, 5), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(deep_small, naive.float(), atol=2e-3, rtol=0)


def test_folder_and_array_resize_agree(tmp_path):
    images = np.stack([rgb(s, 30, 26) for s in range(4)])  # (4, 30, 26, 3)
    for i in range(4):
        (tmp_path / ("ab"[i % 2])).mkdir(exist_ok=True)
        Image.fromarray(images[i]).save(tmp_path / "ab"[i % 2] / f"{i}.png")
    folder = FolderDataset(tmp_path, (13, 17))
    stack = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    arrays = ArrayDataset(stack, torch.tensor([0, 1, 0, 1]), ["a", "b"], (13, 17))
    order = [int(p.stem) for p in folder.paths]
    for j, i in enumerate(order):  # Pillow's and torch's antialiased bilinear filters agree to rounding
        assert (folder[j][0] - arrays[i][0]).abs().max() <= 2 / 255


def test_corrupt_file_named_then_skipped(tmp_path, caplog):
    root = make_folder_tree(tmp_path / "pets", per_class=4)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    jpeg = (root / "cat" / "img1.jpg").read_bytes()
    (root / "emu" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # header fine, data cut
    with pytest.raises(DataError) as info:
        load_dataset(str(root), (8, 8))
    message = str(info.value)
    assert "truncated.jpg" not in message and str(root / "dog" / "broken.png") in message
    assert "--skip-bad-files" in message and "2 bad files" in message and "\n" not in message
    with caplog.at_level(logging.WARNING, logger="cnnkit.data"):
        splits = load_dataset(str(root), (8, 8), skip_bad_files=True)
    assert len(splits.train) + len(splits.val) == 12
    assert "skipped 2 bad image file(s)" in caplog.text
    assert "broken.png" in caplog.text and "truncated.jpg" in caplog.text


def test_known_placeholder_is_a_bad_file(tmp_path, monkeypatch):
    root = make_folder_tree(tmp_path / "pets", per_class=3, classes=("a", "b"))
    data = (root / "b" / "img1.jpg").read_bytes()  # a valid image, declared a placeholder below
    monkeypatch.setattr(folder_module, "KNOWN_PLACEHOLDERS",
                        {(len(data), hashlib.sha256(data).hexdigest()): "a test placeholder"})
    monkeypatch.setattr(folder_module, "_PLACEHOLDER_SIZES", {len(data)})
    with pytest.raises(DataError, match=r"img1\.jpg: a test placeholder; delete it or use --skip-bad-files"):
        FolderDataset(root, (8, 8))
    assert len(FolderDataset(root, (8, 8), skip_bad_files=True)) == 5


def test_symlink_loop_is_not_followed_forever(tmp_path):
    root = make_folder_tree(tmp_path / "pets", per_class=2, classes=("a", "b"))
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)
    assert len(FolderDataset(root, (8, 8))) == 4


def test_folder_seeded_split_and_train_val_layout(tmp_path):
    root = make_folder_tree(tmp_path / "flat", per_class=5, classes=("b", "a"))
    splits = load_dataset(str(root), (8, 8), seed=1)
    assert isinstance(splits.train, FolderDataset) and splits.classes == ["a", "b"] and splits.channels == 3
    assert (len(splits.train), len(splits.val)) == (8, 2)
    assert set(splits.train.paths).isdisjoint(splits.val.paths)
    assert splits.val.paths == load_dataset(str(root), (8, 8), seed=1).val.paths
    assert labels_of(splits.val).tolist() == [0, 1]

    make_folder_tree(tmp_path / "tv" / "train", per_class=2, classes=("x", "y", "z"))
    make_folder_tree(tmp_path / "tv" / "test", per_class=1, classes=("z", "x"))
    splits = load_dataset(str(tmp_path / "tv"), (8, 8), channels=1)
    assert splits.classes == ["x", "y", "z"] and (len(splits.train), len(splits.val)) == (6, 2)
    assert labels_of(splits.val).tolist() == [0, 2] and splits.val[0][0].shape == (1, 8, 8)
    assert "(test/)" in splits.description

    make_folder_tree(tmp_path / "tv" / "val", per_class=1, classes=("x", "w"))
    with pytest.raises(DataError, match=r"class folder\(s\) w that the training set lacks"):
        load_dataset(str(tmp_path / "tv"), (8, 8))


@pytest.mark.parametrize("case, pattern", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("loose", "has images but no class subfolders"),
    ("no_images", "has no image files"),
    ("single", "needs at least 2 classes"),
    ("other", "is not 'digits', an MNIST IDX folder, a CIFAR-10 batches folder or a class-folder tree"),
    ("file", "is a file"),
])
def test_folder_input_errors(tmp_path, case, pattern):
    root = tmp_path / "data"
    if case == "empty":
        root.mkdir()
        (root / ".DS_Store").write_bytes(b"x")
    elif case == "loose":
        root.mkdir()
        Image.fromarray(rgb(0)).save(root / "a.png")
    elif case == "no_images":
        make_folder_tree(root, per_class=1, classes=("a", "b"))
        (root / "c").mkdir()
        (root / "c" / "readme.txt").write_text("x")
    elif case == "single":
        make_folder_tree(root, per_class=2, classes=("only",))
    elif case == "other":
        root.mkdir()
        (root / "readme.txt").write_text("x")
    elif case == "file":
        root.write_text("x")
    with pytest.raises(DataError, match=pattern) as info:
        load_dataset(str(root), (8, 8))
    assert "\n" not in str(info.value)
    if case in ("no_images",):
        assert str(root / "c") in str(info.value)


# ---------------------------------------------------------------- mean image and labels

def test_mean_image_equals_naive_average(tmp_path):
    arrays = ArrayDataset(torch.randint(0, 256, (37, 1, 5, 4), dtype=torch.uint8), torch.arange(37) % 3,
                          ["a", "b", "c"], channels=3)
    mean = compute_mean_image(arrays, batch_size=4)
    assert mean.shape == (3, 5, 4) and mean.dtype == torch.float32
    torch.testing.assert_close(mean, naive_mean(arrays).float())
    floats = ArrayDataset(torch.rand(9, 3, 4, 4), torch.zeros(9, dtype=torch.long), ["a"])
    torch.testing.assert_close(compute_mean_image(floats), naive_mean(floats).float())
    folder = FolderDataset(make_folder_tree(tmp_path / "f", per_class=3, classes=("a", "b")), (6, 6))
    torch.testing.assert_close(compute_mean_image(folder, batch_size=4), naive_mean(folder).float())
    subset = Subset(arrays, [0, 5, 6])
    torch.testing.assert_close(compute_mean_image(subset, batch_size=2), naive_mean(subset).float())


def test_labels_of_never_loads_images(tmp_path, monkeypatch):
    folder = FolderDataset(make_folder_tree(tmp_path / "f", per_class=2, classes=("a", "b")), (6, 6))
    monkeypatch.setattr("cnnkit.data.folder.load_image", lambda *a: pytest.fail("decoded an image"))
    arrays = ArrayDataset(torch.zeros(4, 1, 2, 2), torch.tensor([1, 0, 1, 1]), ["a", "b"])
    assert labels_of(folder).tolist() == [0, 0, 1, 1]
    assert labels_of(Subset(arrays, [3, 1])).tolist() == [1, 0]
    assert labels_of(ConcatDataset([arrays, folder])).tolist() == [1, 0, 1, 1, 0, 0, 1, 1]
    assert labels_of(folder.subset([3, 0])).tolist() == [1, 0]
    assert labels_of([(None, 2), (None, 0)]).tolist() == [2, 0]


# ---------------------------------------------------------------- real data (opt-in)

@pytest.mark.realdata
@pytest.mark.skipif(not (REAL_DATA / "hymenoptera").is_dir(), reason="needs ../shared/data/hymenoptera")
def test_hymenoptera_placeholder_rejected_or_skipped():
    root = REAL_DATA / "hymenoptera"
    with pytest.raises(DataError, match=r"imageNotFound\.gif: a web placeholder.*--skip-bad-files"):
        load_dataset(str(root), (32, 32))
    splits = load_dataset(str(root), (32, 32), skip_bad_files=True)
    assert (len(splits.train), len(splits.val), splits.classes) == (244, 153, ["ants", "bees"])
