"""Segmentation folders (pairing, index/binary/palette masks, ignore value, valid region, resizing,
unreadable files) and metrics."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score as sk_f1
from sklearn.metrics import roc_auc_score

from cnnkit.errors import ConfigError, DataError
from cnnkit.segmentation.data import (
    IGNORE_INDEX,
    VALID_KEY_SUFFIXES,
    check_classes,
    decode_mask,
    generate_textured_shapes,
    load_folder,
    pair_files,
    split_samples,
)
from cnnkit.segmentation.metrics import (
    SegmentationMeter,
    confusion_matrix,
    mean_iou,
    per_class_iou,
    pixel_accuracy,
)

DRIVE = Path(os.environ.get("CNNKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "drive"


def _save(path: Path, arr: np.ndarray, mode: str | None = None, palette: list[int] | None = None) -> Path:
    im = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    if palette:
        im.putpalette(palette)
    im.save(path)
    return path


def test_mask_modes(tmp_path):
    idx = np.array([[0, 1, 2], [2, 1, 255]], np.uint8)
    got = decode_mask(_save(tmp_path / "i.png", idx), ignore_value=255)
    assert got.tolist() == [[0, 1, 2], [2, 1, IGNORE_INDEX]]
    binary = np.array([[0, 255], [255, 0]], np.uint8)
    assert decode_mask(_save(tmp_path / "b.gif", binary)).tolist() == [[0, 1], [1, 0]]
    pal = _save(tmp_path / "p.png", np.array([[0, 1], [1, 0]], np.uint8), "P", [3, 3, 3, 253, 253, 253])
    assert decode_mask(pal).tolist() == [[0, 1], [1, 0]]  # palette-mode: stored index is the class
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 1] = (255, 0, 0)
    rgb[1, 1] = (0, 0, 255)
    path = _save(tmp_path / "c.png", rgb)
    got = decode_mask(path, palette=[(0, 0, 0), (255, 0, 0), (0, 0, 255)], ignore_value=2)
    assert got.tolist() == [[0, 1], [0, IGNORE_INDEX]]
    with pytest.raises(DataError, match="palette"):
        decode_mask(path)
    with pytest.raises(DataError, match=r"colour \(0, 0, 255\)"):
        decode_mask(path, palette=[(0, 0, 0), (255, 0, 0)])


def test_folder_pairs_valid_region_and_errors(tmp_path):
    for sub in ("images", "manual", "fov"):
        (tmp_path / sub).mkdir()
    rng = np.random.default_rng(0)
    for k in ("21", "22"):
        _save(tmp_path / "images" / f"{k}_training.png", rng.integers(0, 255, (6, 5, 3), dtype=np.uint8))
        _save(tmp_path / "manual" / f"{k}_manual1.gif", (rng.random((6, 5)) > 0.5).astype(np.uint8) * 255)
        fov = np.zeros((6, 5), np.uint8)
        fov[1:5, 1:4] = 255
        _save(tmp_path / "fov" / f"{k}_training_mask.gif", fov)
    samples = load_folder(tmp_path, "images", "manual", "fov")
    assert [s.name for s in samples] == ["21_training", "22_training"]
    s = samples[0]
    assert s.image.shape == (3, 6, 5) and s.image.dtype == torch.float32 and s.image.max() <= 1
    assert (s.target[0] == IGNORE_INDEX).all() and (s.target[1:5, 1:4] >= 0).all()
    _save(tmp_path / "manual" / "21_manual1.gif", np.zeros((7, 5), np.uint8))
    with pytest.raises(DataError, match="is 5x6 but its mask 21_manual1.gif is 5x7.*--resize-to-mask"):
        load_folder(tmp_path, "images", "manual", resize_to_mask=False)
    assert load_folder(tmp_path, "images", "manual", resize_to_mask=True)[0].image.shape == (3, 7, 5)
    with pytest.raises(DataError, match="no mask for image 23"):
        pair_files([tmp_path / "23_x.png"], [tmp_path / "21_manual1.gif"], "mask")
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path, "nothing", "manual")


def _touch(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [folder / n for n in names]


def test_drive_names_pair_by_exact_key(tmp_path):
    images = _touch(tmp_path / "images", "21_training.tif", "22_training.tif")
    labels = _touch(tmp_path / "1st_manual", "22_manual1.gif", "21_manual1.gif")
    fov = _touch(tmp_path / "mask", "21_training_mask.gif", "22_training_mask.gif")
    pairs, skipped = pair_files(images, labels, "mask")
    assert [(i.name, m.name) for i, m in pairs] == [("21_training.tif", "21_manual1.gif"),
                                                    ("22_training.tif", "22_manual1.gif")] and skipped == []
    pairs, _ = pair_files(images, fov, "valid-region mask", suffixes=VALID_KEY_SUFFIXES)
    assert [m.name for _, m in pairs] == ["21_training_mask.gif", "22_training_mask.gif"]
    # an equal stem wins over a key: "a" pairs with "a", and "a_mask" is then a mask without an image
    pairs, skipped = pair_files(_touch(tmp_path, "a.png"), _touch(tmp_path / "m", "a.png", "a_mask.png"), "mask",
                                skip_unpaired=True)
    assert [(i.parent.name, m.parent.name) for i, m in pairs] == [(tmp_path.name, "m")]
    assert [p.name for p in skipped] == ["a_mask.png"]


def test_a_missing_mask_is_named_never_substituted(tmp_path):
    images = _touch(tmp_path / "leftImg8bit", "aachen_000001_leftImg8bit.png", "aachen_000002_leftImg8bit.png")
    masks = _touch(tmp_path / "gtFine", "aachen_000001_gtFine_labelIds.png")
    # the old rule (the part before the first underscore) gave both images this one mask
    with pytest.raises(DataError, match="no mask for image aachen_000001_leftImg8bit.png in .*gtFine.*--mask-suffix"):
        pair_files(images, masks, "mask")
    names = {"image_suffixes": ("_leftImg8bit",), "suffixes": ("_gtFine_labelIds",)}
    with pytest.raises(DataError, match=r"no mask for image aachen_000002_leftImg8bit\.png.*--skip-unpaired") as err:
        pair_files(images, masks, "mask", **names)
    assert "\n" not in str(err.value)
    pairs, skipped = pair_files(images, masks, "mask", skip_unpaired=True, **names)
    assert [(i.name, m.name) for i, m in pairs] == [(images[0].name, masks[0].name)]
    assert skipped == [images[1]]
    with pytest.raises(DataError, match="mask aachen_000003_gtFine_labelIds.png has no image in .*leftImg8bit"):
        pair_files(images[:1], [*masks, masks[0].with_name("aachen_000003_gtFine_labelIds.png")], "mask", **names)


def test_skip_unpaired_counts_and_logs_once(tmp_path, caplog):
    images = _touch(tmp_path / "img", "1_image.png", "2_image.png", "3_image.png")
    masks = _touch(tmp_path / "lbl", "1_label.png", "3_label.png", "4_label.png")
    with caplog.at_level(logging.WARNING, logger="cnnkit.segmentation.data"):
        pairs, skipped = pair_files(images, masks, "mask", skip_unpaired=True)
    assert [i.name for i, _ in pairs] == ["1_image.png", "3_image.png"]
    assert [p.name for p in skipped] == ["2_image.png", "4_label.png"]
    assert len(caplog.records) == 1 and "skipped 2 files" in caplog.text


def test_two_files_with_one_key_are_an_error(tmp_path):
    images = _touch(tmp_path / "img", "21_training.tif", "21_test.tif")
    with pytest.raises(DataError, match=r"21_test.tif, 21_training.tif in .*img and 21_manual1.gif in .*have the "
                                        r"same key '21'"):
        pair_files(images, _touch(tmp_path / "lbl", "21_manual1.gif"), "mask")
    with pytest.raises(DataError, match="21_gt.png, 21_mask.png in .* have the same key"):
        pair_files(images[:1], _touch(tmp_path / "lbl", "21_mask.png", "21_gt.png"), "mask")
    pairs, skipped = pair_files(images[:1], _touch(tmp_path / "lbl", "21_mask.png", "21_gt.png"), "mask",
                                skip_unpaired=True)
    assert pairs == [] and len(skipped) == 3


def _folder(root: Path, h: int = 8, w: int = 10, n: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "fov"):
        (root / sub).mkdir(parents=True)
    for k in range(n):
        _save(root / "images" / f"{k}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        _save(root / "masks" / f"{k}_mask.png", rng.integers(0, 3, (h, w), dtype=np.uint8))
        fov = np.zeros((h, w), np.uint8)
        fov[:, : w // 2] = 255
        _save(root / "fov" / f"{k}_fov.png", fov)
    return root


def test_scale_and_size_resize_image_mask_and_valid_together(tmp_path):
    root = _folder(tmp_path)
    full = load_folder(root, valid="fov")[0]
    assert full.valid.dtype == torch.bool and full.valid[:, :5].all() and not full.valid[:, 5:].any()
    assert (full.target[~full.valid] == IGNORE_INDEX).all() and full.mask_file == root / "masks" / "0_mask.png"
    half = load_folder(root, valid="fov", scale=0.5)[0]
    assert half.image.shape == (3, 4, 5) and half.target.shape == half.valid.shape == (4, 5)
    # nearest neighbour of pixel centres: output (y, x) is input (2y + 1, 2x + 1), exactly
    assert torch.equal(half.target[half.valid], full.target[1::2, 1::2][half.valid])
    assert torch.equal(half.valid, full.valid[1::2, 1::2])
    # antialiased bilinear at half size: every output is the mean of its 2x2 block (a triangle filter
    # over 4 source pixels, weights 1/8, 3/8, 3/8, 1/8 per axis)
    w = torch.tensor([1, 3, 3, 1.0]) / 8
    block = torch.nn.functional.pad(full.image, (1, 1, 1, 1), mode="replicate").unfold(1, 4, 2).unfold(2, 4, 2)
    assert torch.allclose(half.image[:, 1:-1, 1:-1], torch.einsum("chwij,i,j->chw", block, w, w)[:, 1:-1, 1:-1],
                          atol=1e-6)
    sized = load_folder(root, valid="fov", size=(3, 7))[1]
    assert sized.image.shape == (3, 3, 7) and sized.target.shape == sized.valid.shape == (3, 7)
    assert set(sized.target[sized.valid].unique().tolist()) <= {0, 1, 2}
    assert (sized.target[~sized.valid] == IGNORE_INDEX).all()
    with pytest.raises(ConfigError, match="--scale or --size"):
        load_folder(root, scale=0.5, size=(3, 3))


def test_unreadable_files_are_one_line_errors_naming_them(tmp_path):
    root = _folder(tmp_path, n=1)
    image = root / "images" / "0.png"
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cannot read image .*0\.png: image file is truncated"):
        load_folder(root)
    image.write_text("not an image\n")
    with pytest.raises(DataError, match=r"cannot read image .*0\.png: cannot identify"):
        load_folder(root)
    for side in (20_000, 12_000):  # over Pillow's hard limit (an error), and over its warning limit
        image.write_bytes(_png_header(side, side))
        with pytest.raises(DataError, match=r"cannot read image .*0\.png: .*decompression bomb"):
            load_folder(root)
    image.write_bytes(good)
    (root / "masks" / "0_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DataError, match=r"cannot read mask .*0_mask\.png"):
        load_folder(root)


def _png_header(w: int, h: int) -> bytes:
    """A small PNG file whose header claims w x h grey pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_mask_values_beyond_the_classes_are_named(tmp_path):
    samples = load_folder(_folder(tmp_path))  # values 0..2
    check_classes(samples, 3)
    with pytest.raises(DataError, match=r"mask .*0_mask\.png has value 2 but there are 2 classes \(0\.\.1\); "
                                        r"raise the number of classes to 3.*--ignore-value 2"):
        check_classes(samples, 2)


def test_split_samples_is_seeded_and_keeps_one_on_each_side():
    samples = generate_textured_shapes(5, size=8)
    train, val = split_samples(samples, 0.4, seed=1)
    assert len(train) == 3 and len(val) == 2
    assert sorted(s.name for s in train + val) == [s.name for s in samples]
    again = split_samples(samples, 0.4, seed=1)
    assert [s.name for s in again[1]] == [s.name for s in val]
    assert {tuple(s.name for s in split_samples(samples, 0.4, seed)[1]) for seed in range(10)} != {
        tuple(s.name for s in val)}
    assert [len(part) for part in split_samples(samples[:2], 0.01, 0)] == [1, 1]
    assert [len(part) for part in split_samples(samples[:2], 0.99, 0)] == [1, 1]
    assert split_samples(samples, 0, 0) == (samples, [])
    with pytest.raises(ConfigError, match="--val-fraction"):
        split_samples(samples, 1.0, 0)
    with pytest.raises(DataError, match="--val-fraction 0"):
        split_samples(samples[:1], 0.2, 0)


def test_generated_default_needs_context():
    samples = generate_textured_shapes(4, size=32, seed=3)
    assert len(samples) == 4 and samples[0].image.shape == (3, 32, 32)
    labels = torch.stack([s.target for s in samples])
    assert set(labels.unique().tolist()) == {0, 1, 2}
    # a single pixel's grey value says (almost) nothing about its class: class means agree
    grey = torch.stack([s.image.mean(0) for s in samples])
    means = [grey[labels == c].mean().item() for c in range(3)]
    assert max(means) - min(means) < 0.05
    again = generate_textured_shapes(4, size=32, seed=3)
    assert all(torch.equal(a.image, b.image) for a, b in zip(samples, again))


def test_metrics_against_a_naive_twin():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 2, 9, 7), 1)
    target = torch.randint(0, 2, (2, 9, 7))
    target[0, :2] = IGNORE_INDEX
    meter = SegmentationMeter(2)
    meter.update(probs[:1], target[:1])
    meter.update(probs[1:], target[1:])
    m = meter.compute()
    valid = target != IGNORE_INDEX
    pred = probs.argmax(1)
    t, p = target[valid].numpy(), pred[valid].numpy()
    assert m["pixel_accuracy"] == pytest.approx((t == p).mean())
    for c in range(2):
        inter = ((t == c) & (p == c)).sum()
        union = ((t == c) | (p == c)).sum()
        assert m["per_class_iou"][c] == pytest.approx(inter / union)
    assert m["mean_iou"] == pytest.approx(np.mean(m["per_class_iou"]))
    assert m["f1"] == pytest.approx(sk_f1(t, p))
    # a histogram AUC: two tied pixels in one of 2^16 bins move 112 pixels' AUC by 1.6e-4
    assert m["roc_auc"] == pytest.approx(roc_auc_score(t, probs[:, 1][valid].numpy()), abs=5e-4)


def test_iou_of_absent_class_is_left_out_of_the_mean():
    cm = confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), 3)
    assert per_class_iou(cm)[2] != per_class_iou(cm)[2]  # NaN
    assert mean_iou(cm) == 1.0 and pixel_accuracy(cm) == 1.0


@pytest.mark.realdata
@pytest.mark.skipif(not DRIVE.is_dir(), reason="DRIVE not present")
def test_drive_folder_reads_with_field_of_view():
    for split in ("training", "test"):  # every image pairs with its manual labels and its field of view
        images = sorted((DRIVE / split / "images").iterdir())
        pairs, skipped = pair_files(images, sorted((DRIVE / split / "1st_manual").iterdir()), "mask")
        fov, skipped_fov = pair_files(images, sorted((DRIVE / split / "mask").iterdir()), "valid-region mask",
                                      suffixes=VALID_KEY_SUFFIXES)
        assert len(pairs) == len(fov) == 20 and skipped == skipped_fov == []
        assert all(i.name.split("_")[0] == m.name.split("_")[0] == v.name.split("_")[0]
                   for (i, m), (_, v) in zip(pairs, fov))
    samples = load_folder(DRIVE / "training", "images", "1st_manual", "mask")
    assert len(samples) == 20
    s = samples[0]
    assert s.image.shape == (3, 584, 565) and s.mask_file.name == "21_manual1.gif"
    valid = s.target != IGNORE_INDEX
    assert torch.equal(valid, s.valid)
    frac = (s.target[valid] == 1).float().mean().item()
    assert 0.05 < frac < 0.2 and 0.6 < valid.float().mean() < 0.8  # ~9-12% vessels inside the FOV
