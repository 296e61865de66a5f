"""`cnnkit segment --volume`: volumes read from multi-page TIFFs and folders of slices, 3D and 2.5D patch
nets trained through the runner, label volumes written and scored, each voxel's probability equal to the
patch net on that voxel's patch, resume, and one error line for every bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from cnnkit.dense import densify, patch_by_patch
from cnnkit.dense.tiling import pad_image
from cnnkit.errors import ConfigError, DataError
from cnnkit.models import create_patch_net
from cnnkit.segmentation.augment import dihedral, preprocess
from cnnkit.segmentation.data import SegmentationSample
from cnnkit.segmentation.predict import Segmenter, predict_volumes
from cnnkit.segmentation.task import SegmentationTask, SegmentConfig, fit_segmentation
from cnnkit.segmentation.volume import (
    VolumeMode,
    context_stack,
    load_mask_volume,
    load_volume,
    load_volume_folder,
    natural_key,
    slice_samples,
    volume_probabilities,
)
from cnnkit.train.checkpoint import load_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")
SHAPE = (12, 24, 24)  # slices x height x width


def cnnkit(*args, timeout=240) -> subprocess.CompletedProcess:
    """The command as a user runs it: a fresh process, a clean environment."""
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "cnnkit", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _ball(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright noisy ellipsoid in a darker noisy volume: (uint8 image, 0/1 labels)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    cy, cx = rng.uniform(8, 16, 2)
    labels = ((z - 6) ** 2 / 4 + (y - cy) ** 2 + (x - cx) ** 2 < 40).astype(np.uint8)
    image = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.1, SHAPE), 0, 1)
    return (image * 255).astype(np.uint8), labels


def _write_slices(folder: Path, volume: np.ndarray, scale: int = 1) -> None:
    """One PNG per slice named s1 .. s12: natural order differs from name order (s10 < s2)."""
    folder.mkdir(parents=True)
    for z, page in enumerate(volume, start=1):
        Image.fromarray((page * scale).astype(np.uint8)).save(folder / f"s{z}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three volumes: two multi-page TIFFs (masks index and 0/255 TIFFs) and one folder of PNG slices."""
    root = tmp_path_factory.mktemp("vol")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(3):
        image, labels = _ball(i)
        if i == 1:
            _write_slices(root / "images" / "vol1", image)
            _write_slices(root / "masks" / "vol1", labels, 255)
        else:
            tifffile.imwrite(root / "images" / f"vol{i}.tif", image, photometric="minisblack")
            tifffile.imwrite(root / "masks" / f"vol{i}_mask.tif", labels * (1 if i == 0 else 255),
                             photometric="minisblack")
    return root


def _train(data: Path, out: Path, *flags: str) -> Path:
    done = cnnkit("segment", "train", "--data", str(data), "--option", "width=2", "--crop", "8",
                  "--val-fraction", "0.34", "--no-threshold-tta", "--dense-mode", "dilated", "--out", str(out), *flags)
    assert done.returncode == 0, done.stderr
    return out / "best.safetensors"


@pytest.fixture(scope="module")
def run3d(data, tmp_path_factory) -> Path:
    return _train(data, tmp_path_factory.mktemp("r") / "3d", "--volume", "3d", "--epochs", "1")


@pytest.fixture(scope="module")
def run25d(data, tmp_path_factory) -> Path:
    return _train(data, tmp_path_factory.mktemp("r") / "25d", "--volume", "2.5d=2", "--option", "patch=16",
                  "--epochs", "1")


# --------------------------------------------------------------------------- reading


def test_both_formats_read_to_the_stored_values(data, tmp_path):
    image, labels = _ball(1)
    assert [p.name for p in sorted((data / "images" / "vol1").iterdir(), key=natural_key)][:3] == \
        ["s1.png", "s2.png", "s3.png"]  # natural order: s2 before s10
    folder = load_volume(data / "images" / "vol1")
    assert folder.shape == (1, *SHAPE) and folder.dtype == torch.float32
    assert torch.equal(folder[0], torch.from_numpy(image).float() / 255)
    assert torch.equal(load_mask_volume(data / "masks" / "vol1"), torch.from_numpy(labels).long())  # 0/255 slices
    image0, labels0 = _ball(0)
    assert torch.equal(load_volume(data / "images" / "vol0.tif")[0], torch.from_numpy(image0).float() / 255)
    assert torch.equal(load_mask_volume(data / "masks" / "vol0_mask.tif"), torch.from_numpy(labels0).long())
    # 16-bit grey and RGB TIFFs: values / 65535, samples as channels
    grey = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4) * 1000
    tifffile.imwrite(tmp_path / "g.tif", grey, photometric="minisblack")
    assert torch.equal(load_volume(tmp_path / "g.tif"), torch.from_numpy(grey[None].astype(np.float32) / 65535))
    rgb = np.random.default_rng(0).integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "c.tif", rgb, photometric="rgb")
    assert torch.equal(load_volume(tmp_path / "c.tif"), torch.from_numpy(rgb.transpose(3, 0, 1, 2) / np.float32(255)))
    samples = load_volume_folder(data)  # pairs vol0 <-> vol0_mask.tif, vol1/ <-> vol1/, vol2 <-> vol2_mask.tif
    assert [(s.name, s.mask_file.name, tuple(s.image.shape)) for s in samples] == \
        [(f"vol{i}", f"vol{i}{'' if i == 1 else '_mask.tif'}", (1, *SHAPE)) for i in range(3)]
    assert all(set(s.target.unique().tolist()) == {0, 1} for s in samples)


def test_context_stack_replicates_the_edge_slices_slice_major():
    volume = torch.arange(2 * 4 * 1 * 1, dtype=torch.float32).view(2, 4, 1, 1)  # channel c, slice z: 4c + z
    stack = context_stack(volume, 0, 2)  # slices -2 .. 2 -> 0, 0, 0, 1, 2
    assert stack.flatten().tolist() == [0, 4, 0, 4, 0, 4, 1, 5, 2, 6]
    assert context_stack(volume, 3, 1).flatten().tolist() == [2, 6, 3, 7, 3, 7]
    assert VolumeMode.parse("2.5d") == VolumeMode("2.5d", 1) and VolumeMode.parse("none") is None
    slices = slice_samples([SegmentationSample("v", volume, torch.zeros(4, 1, 1).long())], 1)
    assert [s.name for s in slices] == ["v_z0000", "v_z0001", "v_z0002", "v_z0003"]
    assert all(s.image.shape == (6, 1, 1) for s in slices)


# --------------------------------------------------------------------------- train, predict, eval


def test_3d_run_predicts_label_volumes_and_scores_them(run3d, data, tmp_path):
    ckpt = load_checkpoint(run3d)
    assert ckpt.model_name == "segment3d" and ckpt.meta["volume"] == {"mode": "3d", "context": 0}
    assert ckpt.meta["patch"] == [16, 16, 16]
    files = {p.name for p in run3d.parent.iterdir()}
    assert {"metrics.csv", "examples.png", "last.safetensors", "heldout.json"} <= files
    out = tmp_path / "labels"
    done = cnnkit("segment", "predict", str(run3d), "--images", str(data / "images"), "--out", str(out), "--no-tta")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout == f"wrote the label volumes of 3 volumes to {out}\n"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"vol{i}_{k}.tif" for i in range(3)
                                                           for k in ("labels", "prob"))
    labels, prob = tifffile.imread(out / "vol1_labels.tif"), tifffile.imread(out / "vol1_prob.tif")
    assert labels.shape == prob.shape == SHAPE and labels.dtype == np.uint8 and prob.dtype == np.uint16
    assert set(np.unique(labels).tolist()) <= {0, 1}
    scores = tmp_path / "scores.json"
    done = cnnkit("segment", "eval", str(run3d), "--data", str(data), "--no-tta", "--out", str(scores))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert f"(3 volumes, {3 * np.prod(SHAPE)} voxels, threshold" in done.stdout
    result = json.loads(scores.read_text())
    assert result["pixels"] == 3 * np.prod(SHAPE) and len(result["per_class_iou"]) == 2
    assert 0 <= result["roc_auc"] <= 1 and 0 <= result["f1"] <= 1


def test_25d_run_predicts_each_slice_with_its_neighbours(run25d, data, tmp_path):
    ckpt = load_checkpoint(run25d)
    assert ckpt.model_name == "segment" and ckpt.meta["volume"] == {"mode": "2.5d", "context": 2}
    assert ckpt.model_options["in_chans"] == 5 and ckpt.meta["patch"] == [16, 16]
    out = tmp_path / "labels"
    done = cnnkit("segment", "predict", str(run25d), "--images", str(data / "images" / "vol1"),
                  str(data / "images" / "vol2.tif"), "--out", str(out), "--no-tta")  # a folder of slices, a TIFF
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["vol1_labels.tif", "vol1_prob.tif", "vol2_labels.tif",
                                                     "vol2_prob.tif"]
    assert tifffile.imread(out / "vol2_labels.tif").shape == SHAPE
    done = cnnkit("segment", "eval", str(run25d), "--data", str(data), "--no-tta")
    assert done.returncode == 0, done.stderr
    assert f"(3 volumes, {3 * np.prod(SHAPE)} voxels" in done.stdout


def _patch_probs(model, x: torch.Tensor, patch, border: str, at) -> torch.Tensor:
    """Slow twin: the patch net on the patch around each position of ``at`` in x (C, *L), padded once."""
    xp = pad_image(x[None], patch, border)[0]
    cut = [xp[(slice(None), *(slice(i, i + p) for i, p in zip(pos, patch)))] for pos in at]
    return model(torch.stack(cut)).softmax(1)  # (len(at), K)


def test_dense_volume_probabilities_equal_patch_by_patch(run3d, run25d, data, tmp_path):
    volume = load_volume(data / "images" / "vol0.tif").double()
    at = [(0, 0, 0), (5, 11, 23), (11, 7, 2), (3, 23, 12)]
    # 3D, with test-time averaging over the checkpoint's symmetries (flip: identity and left-right)
    seg = Segmenter(run3d, tta=True, dtype=torch.float64)
    probs = volume_probabilities(seg, volume)  # (K, D, H, W)
    model, patch, border = seg.members[0].dense.model, seg.members[0].dense.patch, seg.members[0].dense.border
    x = preprocess(volume, None, **seg.members[0].preprocess)
    assert seg.meta["symmetries"] == [0, 4] and border == "reflect"
    w = volume.shape[-1]
    with torch.no_grad():
        direct = _patch_probs(model, x, patch, border, at)
        mirrored = _patch_probs(model, dihedral(x, 4), patch, border, [(z, y, w - 1 - i) for z, y, i in at])
    want = (direct + mirrored) / 2
    got = torch.stack([probs[(slice(None), *pos)] for pos in at])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    tifffile.imwrite(tmp_path / "thin.tif", np.zeros((4, 24, 24), np.uint8), photometric="minisblack")
    with pytest.raises(DataError, match="thin.tif is 4x24x24 but .* reflects 8 voxels at its border"):
        predict_volumes(seg, [tmp_path / "thin.tif"], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # 2.5D: slice z with 2 neighbours a side as 5 channels, a 2D patch net
    seg = Segmenter(run25d, tta=False, dtype=torch.float64)
    probs = volume_probabilities(seg, volume)
    member = seg.members[0]
    with torch.no_grad():
        want = torch.cat([_patch_probs(member.dense.model, preprocess(context_stack(volume, z, 2), None,
                                                                      **member.preprocess),
                                       member.dense.patch, member.dense.border, [(y, i)]) for z, y, i in at])
    got = torch.stack([probs[(slice(None), *pos)] for pos in at])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_segment3d_dense_equals_patch_by_patch_in_float64():
    torch.manual_seed(0)
    model, patch = create_patch_net("segment3d", width=2, in_chans=2, num_classes=3)
    model = model.double().eval()
    x = torch.randn(1, 2, 4, 5, 3, dtype=torch.float64)
    dense = densify(model, patch, border="replicate", mode="dilated")
    torch.testing.assert_close(dense(x), patch_by_patch(model, x, patch, border="replicate"), rtol=1e-10, atol=1e-10)


def test_resumed_3d_run_continues_bit_for_bit(data, tmp_path, monkeypatch):
    def cfg(out):
        return SegmentConfig(data=str(data), volume="3d", model_options={"width": 2}, crop=8, epochs=2,
                             val_fraction=0.34, out=str(out), dense_mode="dilated", threshold_tta=False)

    straight = fit_segmentation(cfg(tmp_path / "a"), progress=False)
    real = SegmentationTask.evaluate

    def interrupted(self, model, *, epoch, **rest):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(self, model, epoch=epoch, **rest)

    monkeypatch.setattr(SegmentationTask, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit_segmentation(cfg(tmp_path / "b"), progress=False)
    monkeypatch.setattr(SegmentationTask, "evaluate", real)
    assert load_checkpoint(tmp_path / "b" / "last.safetensors").epoch == 1
    resumed = fit_segmentation(cfg(tmp_path / "b"), resume=True, progress=False)
    a = load_checkpoint(straight["last_checkpoint"]).model_state
    b = load_checkpoint(resumed["last_checkpoint"]).model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(resumed["last_checkpoint"]).meta["volume"] == {"mode": "3d", "context": 0}


# --------------------------------------------------------------------------- bad input: one line, status 2


def _copy_data(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _pages_of_two_sizes(root: Path) -> list[str]:
    with tifffile.TiffWriter(root / "images" / "vol0.tif") as tif:
        tif.write(np.zeros((24, 24), np.uint8), photometric="minisblack")
        tif.write(np.zeros((20, 24), np.uint8), photometric="minisblack")
    return ["image volume", "vol0.tif: page 2 is 20x24 but page 1 is 24x24"]


def _mask_of_another_shape(root: Path) -> list[str]:
    tifffile.imwrite(root / "masks" / "vol2_mask.tif", np.zeros((10, 24, 24), np.uint8), photometric="minisblack")
    return ["mask volume", "vol2_mask.tif is 10x24x24 (slices x height x width) but image volume vol2.tif is 12x24x24"]


def _empty_slice_folder(root: Path) -> list[str]:
    for p in (root / "images" / "vol1").iterdir():
        p.unlink()
    return ["image volume folder", "vol1 holds no slice images"]


def _not_a_tiff(root: Path) -> list[str]:
    (root / "images" / "vol2.tif").write_text("not an image")
    return ["cannot read image volume", "vol2.tif: not a TIFF file", "re-save it as a multi-page TIFF"]


def _flat_slices(root: Path) -> list[str]:
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(root / "images" / "stray.png")
    return ["holds 2D images (stray.png, ...) but each entry of a folder of volumes is a multi-page TIFF"]


@pytest.mark.parametrize("damage", [_pages_of_two_sizes, _mask_of_another_shape, _not_a_tiff])
def test_bad_volumes_give_one_error_line(data, tmp_path, damage):
    root = _copy_data(data, tmp_path / "d")
    named = damage(root)
    done = cnnkit("segment", "train", "--data", str(root), "--volume", "3d", "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert all(n in done.stderr for n in named), done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", [_empty_slice_folder, _flat_slices, _pages_of_two_sizes, _not_a_tiff])
def test_bad_volumes_are_one_line_data_errors(data, tmp_path, damage):
    """The same errors without a process each (the command prints them as above)."""
    root = _copy_data(data, tmp_path / "d")
    named = damage(root)
    with pytest.raises(DataError) as err:
        load_volume_folder(root)
    assert "\n" not in str(err.value) and all(n in str(err.value) for n in named), err.value


def test_a_2d_net_for_3d_volumes_gives_one_error_line(data, tmp_path):
    done = cnnkit("segment", "train", "--data", str(data), "--out", str(tmp_path / "run"), "--volume", "3d",
                  "--model", "toy")
    assert done.returncode == 2 and done.stdout == "" and done.stderr == (
        "error: patch net 'toy' reads 15x15 patches but --volume 3d takes 3D ones; use a 3D patch net "
        "(e.g. --model segment3d)\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("settings,named", [
    ({"volume": "4d"}, "--volume '4d': write 3d, 2.5d or 2.5d=K"),
    ({"volume": "2.5d=0"}, "--volume '2.5d=0': write 3d, 2.5d or 2.5d=K"),
    ({"volume": "2.5d", "valid": "fov"}, "--volume 2.5d=1 does not take --valid; drop it"),
    ({"volume": "3d", "augment": "elastic"}, "--volume 3d does not take elastic augmentation"),
])
def test_bad_volume_settings_are_refused_before_anything_starts(data, settings, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        SegmentConfig(data=str(data), **settings).validate()


def test_damaged_volume_metadata_and_mismatched_masks_are_refused(run3d, data, tmp_path):
    with safe_open(str(run3d), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    doc = json.loads(metadata["cnnkit"])
    doc["meta"]["volume"]["mode"] = "4d"
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**metadata, "cnnkit": json.dumps(doc)})
    done = cnnkit("segment", "predict", str(tmp_path / "bad.safetensors"), "--images", str(data / "images"),
                  "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "metadata field 'meta.volume.mode' must be one of \"3d\", \"2.5d\", found \"4d\"" in done.stderr
    assert not (tmp_path / "out").exists()
    root = _copy_data(data, tmp_path / "d")
    _mask_of_another_shape(root)
    done = cnnkit("segment", "eval", str(run3d), "--data", str(root), "--no-tta")
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: mask volume ") and "pass the mask made for this volume" in done.stderr
