"""Segmentation folders (index, binary, palette masks; ignore value; valid region) and metrics."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score as sk_f1
from sklearn.metrics import roc_auc_score

from cnnkit.analysis.segmentation_metrics import (
    SegmentationMeter,
    confusion_matrix,
    mean_iou,
    per_class_iou,
    pixel_accuracy,
)
from cnnkit.data.segmentation import (
    IGNORE_INDEX,
    decode_mask,
    generate_textured_shapes,
    load_folder,
    pair_files,
)
from cnnkit.errors import DataError

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
    with pytest.raises(DataError, match="is 5x6 but its mask is 5x7"):
        load_folder(tmp_path, "images", "manual", resize_to_mask=False)
    with pytest.raises(DataError, match="no mask for image 23"):
        pair_files([tmp_path / "23_x.png"], [tmp_path / "21_manual1.gif"], "mask")
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path, "nothing", "manual")


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
    assert m["roc_auc"] == pytest.approx(roc_auc_score(t, probs[:, 1][valid].numpy()))


def test_iou_of_absent_class_is_left_out_of_the_mean():
    cm = confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), 3)
    assert per_class_iou(cm)[2] != per_class_iou(cm)[2]  # NaN
    assert mean_iou(cm) == 1.0 and pixel_accuracy(cm) == 1.0


@pytest.mark.realdata
@pytest.mark.skipif(not DRIVE.is_dir(), reason="DRIVE not present")
def test_drive_folder_reads_with_field_of_view():
    samples = load_folder(DRIVE / "training", "images", "1st_manual", "mask")
    assert len(samples) == 20
    s = samples[0]
    assert s.image.shape == (3, 584, 565)
    valid = s.target != IGNORE_INDEX
    frac = (s.target[valid] == 1).float().mean().item()
    assert 0.05 < frac < 0.2 and 0.6 < valid.float().mean() < 0.8  # ~9-12% vessels inside the FOV
