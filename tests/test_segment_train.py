"""``cnnkit segment train`` through the one runner: training items that equal the dense net on the whole
image, the loss, the run folder, resume bit for bit, torchrun, a user's own net, and bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cnnkit.dense import densify
from cnnkit.models import create_patch_net
from cnnkit.segmentation.augment import JointAugment, preprocess
from cnnkit.segmentation.data import IGNORE_INDEX, SegmentationSample
from cnnkit.segmentation.task import (
    CropDataset,
    CropNet,
    SegmentationTask,
    SegmentConfig,
    epoch_seed_item,
    fit_segmentation,
    pixel_losses,
    standardization,
)
from cnnkit.train.checkpoint import load_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")


def quick(out: Path, **kw) -> SegmentConfig:
    base = dict(out=str(out), epochs=2, generated_count=10, crop=24, crops_per_image=2, batch_size=4,
                model_options={"width": 3, "patch": 16}, dense_mode="dilated", threshold_tta=False, device="cpu")
    return SegmentConfig(**{**base, **kw})


def cnnkit(*args, cwd=None, timeout=240) -> subprocess.CompletedProcess:
    """The installed command as a user runs it: a fresh process with a clean environment."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "cnnkit", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_a_training_item_is_the_dense_net_on_the_whole_image():
    """The window cut from the padded image, run without padding, gives exactly the dense net's output
    on the whole image at the crop's pixels (no augmentation; float64)."""
    torch.manual_seed(0)
    model, patch = create_patch_net("segment", num_classes=3, in_chans=2, width=2, patch=17)  # odd and even
    model = model.double().eval()
    image = torch.rand(2, 30, 27, dtype=torch.float64)
    target = torch.randint(0, 3, (30, 27))
    target[:4] = IGNORE_INDEX  # crops are centred on labelled pixels
    sample = SegmentationSample("x", image, target)
    for border in ("reflect", "zeros"):
        items = CropDataset([sample], 11, patch, border, JointAugment.from_spec("none"), 3, seed=4)
        dense = densify(model, patch, border=border)
        whole = dense(image[None])[0]
        for i in range(3):
            x, y = items[i]
            top, left = items.position(0, torch.Generator().manual_seed(epoch_seed_item(4, 0, i)))
            assert x.shape == (2, 11 + 17 - 1, 11 + 17 - 1)
            torch.testing.assert_close(CropNet(dense)(x[None])[0], whole[:, top:top + 11, left:left + 11],
                                       rtol=1e-12, atol=1e-12)
            assert torch.equal(y, target[top:top + 11, left:left + 11])
            assert 0 <= top <= 30 - 11 and 0 <= left <= 27 - 11


def test_crops_are_centred_on_labelled_pixels():
    target = torch.full((40, 40), IGNORE_INDEX)
    target[30:, 30:] = 1  # the only labelled corner
    items = CropDataset([SegmentationSample("x", torch.rand(1, 40, 40), target)], 8, (3, 3), "zeros",
                        JointAugment.from_spec("none"), 20, seed=0)
    for i in range(20):
        x, y = items[i]
        assert (y != IGNORE_INDEX).any()


def test_training_crops_are_standardised_like_prediction():
    """Intensity jitter runs on the crop in [0, 1], then the whole image's standardisation: without
    jitter a crop equals the crop of what prediction's preprocess gives."""
    image = torch.rand(3, 20, 20)
    valid = torch.zeros(20, 20, dtype=torch.bool)
    valid[3:17, 2:18] = True
    sample = SegmentationSample("x", image, torch.zeros(20, 20, dtype=torch.long), valid)
    items = CropDataset([sample], 20, (1, 1), "zeros", JointAugment.from_spec("none"), 1, 0,
                        [standardization(image, valid)])
    x, _ = items[0]
    torch.testing.assert_close(x, preprocess(image, valid, normalize="image"))


def test_pixel_losses_against_loops():
    torch.manual_seed(1)
    scores = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    target = torch.randint(0, 2, (3, 5, 4))
    target[0, :2] = IGNORE_INDEX
    target[2] = IGNORE_INDEX  # a crop without labelled pixels counts 0
    weight = torch.tensor([0.5, 3.0], dtype=torch.float64)
    for fraction in (1.0, 0.3):
        got = pixel_losses(scores, target, weight, fraction)
        for n in range(3):
            terms = [(weight[target[n, i, j]] * -F.log_softmax(scores[n, :, i, j], 0)[target[n, i, j]],
                      weight[target[n, i, j]])
                     for i in range(5) for j in range(4) if target[n, i, j] != IGNORE_INDEX]
            terms.sort(key=lambda t: -float(t[0]))  # the hardest first
            keep = terms[:math.ceil(fraction * len(terms))]
            want = sum(t[0] for t in keep) / sum(t[1] for t in keep) if keep else 0.0
            assert float(got[n]) == pytest.approx(float(want), rel=1e-12)


def test_run_folder_metrics_and_threshold(tmp_path):
    summary = fit_segmentation(quick(tmp_path / "run", num_classes=2), progress=False)
    out = tmp_path / "run"
    names = {p.name for p in out.iterdir()}
    assert {"args.json", "config.toml", "metrics.csv", "curves.png", "examples.png", "best.safetensors",
            "last.safetensors", "heldout.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "val_loss", "val_pixel_accuracy", "val_mean_iou", "val_f1", "val_roc_auc"} <= set(rows[0])
    best = load_checkpoint(out / "best.safetensors")
    assert best.meta["task"] == "segment" and best.meta["patch"] == [16, 16] and best.classes == ["0", "1"]
    assert 0 <= best.meta["threshold"] <= 1  # picked on the held-out images after training
    assert json.loads((out / "heldout.json").read_text())["best_threshold"] == best.meta["threshold"]
    assert summary["task"] == "segment" and summary["best"]["val_roc_auc"] == max(float(r["val_roc_auc"])
                                                                                   for r in rows)
    args = json.loads((out / "args.json").read_text())
    assert args["task"] == "segment" and args["model"] == "segment"


def test_resume_after_an_interruption_is_bit_for_bit(tmp_path, monkeypatch):
    kw = dict(epochs=3, augment="dihedral,elastic=8:3,intensity=0.1")
    straight = fit_segmentation(quick(tmp_path / "a", **kw), progress=False)
    real = SegmentationTask.evaluate

    def interrupted(self, model, *, epoch, **rest):
        if epoch == 3:
            raise KeyboardInterrupt
        return real(self, model, epoch=epoch, **rest)

    monkeypatch.setattr(SegmentationTask, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit_segmentation(quick(tmp_path / "b", **kw), progress=False)
    monkeypatch.setattr(SegmentationTask, "evaluate", real)
    assert load_checkpoint(tmp_path / "b" / "last.safetensors").epoch == 2
    resumed = fit_segmentation(quick(tmp_path / "b", **kw), resume=True, progress=False)
    a = load_checkpoint(straight["last_checkpoint"]).model_state
    b = load_checkpoint(resumed["last_checkpoint"]).model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_auto_layouts_are_pinned_in_the_checkpoint(tmp_path):
    fit_segmentation(quick(tmp_path / "run", epochs=1, dense_mode="auto"), progress=False)
    layouts = load_checkpoint(tmp_path / "run" / "last.safetensors").meta["layouts"]
    assert layouts and set(layouts.values()) <= {"dilated", "keep", "space_to_batch"}


@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one(tmp_path):
    from tests.test_distributed import free_port

    common = ["segment", "train", "--epochs", "1", "--generated-count", "10", "--crop", "24", "--batch-size", "7",
              "--crops-per-image", "2", "--option", "width=3", "--option", "patch=16", "--dense-mode", "dilated",
              "--no-threshold-tta", "--device", "cpu", "--augment", "dihedral,elastic=8:3,intensity=0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "cnnkit", *common,
           "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = cnnkit(*common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_checkpoint(tmp_path / "one" / "last.safetensors").model_state
    b = load_checkpoint(tmp_path / "two" / "last.safetensors").model_state
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert load_checkpoint(tmp_path / "two" / "last.safetensors").meta["config"]["batch_size"] == 7


NETS = '''
import torch
from torch import nn

def tiny(num_classes=2, in_chans=3):
    return nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.ReLU(), nn.Conv2d(4, num_classes, 3), nn.Flatten()), 5

def padded(num_classes=2, in_chans=3):
    return nn.Sequential(nn.Conv2d(in_chans, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, num_classes, 5),
                         nn.Flatten()), 5
'''


def _folder(root: Path, n: int = 6, size: int = 20, masks: int | None = None, value: int = 1) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        if masks is None or i < masks:
            mask = np.zeros((size, size), np.uint8)
            mask[: size // 2] = value
            Image.fromarray(mask).save(root / "masks" / f"im{i}_mask.png")
    return root


def test_user_net_trains_and_its_checkpoint_needs_the_same_flag(tmp_path):
    (tmp_path / "mynets.py").write_text(NETS)
    data = _folder(tmp_path / "data")
    env_dir = str(tmp_path)
    run = subprocess.run([sys.executable, "-m", "cnnkit", "segment", "train", "--data", str(data), "--model",
                          "mynets:tiny", "--epochs", "1", "--crop", "8", "--out", str(tmp_path / "run")],
                         env={"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}:{env_dir}"},
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    ckpt = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert ckpt.model_name == "mynets:tiny" and ckpt.meta["patch"] == [5, 5]
    refused = cnnkit("segment", "predict", str(tmp_path / "run" / "best.safetensors"), "--images",
                     str(data / "images"), "--out", str(tmp_path / "labels"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "pass --model mynets:tiny" in refused.stderr and not (tmp_path / "labels").exists()


@pytest.mark.parametrize("case", ["missing_mask", "class_beyond", "not_exact", "bad_flag", "nan_lr"])
def test_bad_input_is_one_line_and_leaves_no_run_folder(tmp_path, case):
    (tmp_path / "mynets.py").write_text(NETS)
    out = tmp_path / "run"
    args = ["segment", "train", "--out", str(out), "--epochs", "1", "--crop", "8"]
    if case == "missing_mask":
        data = _folder(tmp_path / "data", masks=5)
        args += ["--data", str(data)]
        expect = "error: no mask for image im5.png"
    elif case == "class_beyond":
        data = _folder(tmp_path / "data", value=7)
        args += ["--data", str(data), "--classes", "3"]
        expect = "error: mask "
    elif case == "not_exact":
        data = _folder(tmp_path / "data")
        args += ["--data", str(data), "--model", "mynets:padded"]
        expect = "error: "
    elif case == "bad_flag":
        args += ["--crop", "0"]
        expect = "error: argument --crop: '0' is not a positive whole number"
    else:
        args += ["--lr", "nan"]
        expect = "error: argument --lr: 'nan' is not a positive number"
    env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}:{tmp_path}"}
    done = subprocess.run([sys.executable, "-m", "cnnkit", *args], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(expect) and done.stderr.count("\n") == 1, done.stderr
    if case == "not_exact":
        assert "padding" in done.stderr and "0" in done.stderr  # names the layer (module 0) and the reason
    if case == "class_beyond":
        assert "value 7" in done.stderr
    assert not out.exists()
