"""`cnnkit segment train|predict` and `cnnkit densify`: outputs, and one-line errors with status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cnnkit.cli import main
from cnnkit.data.segmentation import generate_textured_shapes


@pytest.fixture(autouse=True, scope="module")
def _default_malloc():
    """The command tunes glibc malloc for its own process; leave pytest's alone."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("cnnkit.cli.dense.retain_freed_memory", lambda: False)
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A folder dataset written from the generated default: images/*.png and masks/*.png."""
    root = tmp_path_factory.mktemp("seg")
    for sub in ("images", "masks", "fov"):
        (root / sub).mkdir()
    fov = np.zeros((40, 40), np.uint8)
    fov[5:35, 5:35] = 255
    for s in generate_textured_shapes(3, size=40, seed=5):
        Image.fromarray((s.image.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)).save(
            root / "images" / f"{s.name}.png")
        Image.fromarray(s.target.numpy().astype(np.uint8)).save(root / "masks" / f"{s.name}.png")
        Image.fromarray(fov).save(root / "fov" / f"{s.name}_fov.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "seg.safetensors"
    rc = main(["segment", "train", "--data", str(data_dir), "--epochs", "2", "--width", "4", "--patch", "18",
               "--out", str(out)])
    assert rc == 0 and out.is_file()
    return out


def test_train_on_generated_data(tmp_path, capsys):
    out = tmp_path / "g.safetensors"
    rc = main(["segment", "train", "--data", "generated", "--generated-count", "3", "--epochs", "1",
               "--width", "4", "--patch", "16", "--mode", "patches", "--steps-per-epoch", "3",
               "--out", str(out)])
    assert rc == 0 and out.is_file()
    assert "pixel_accuracy" in capsys.readouterr().out


def test_predict_writes_labels_probabilities_overlays(checkpoint, data_dir, tmp_path, capsys):
    out = tmp_path / "pred"
    rc = main(["segment", "predict", str(checkpoint), str(data_dir / "images"), "--out", str(out),
               "--masks", str(data_dir / "masks"), "--max-memory", "4"])
    assert rc == 0
    labels = Image.open(out / "generated_000_labels.png")
    assert labels.size == (40, 40) and labels.mode == "L"
    assert max(np.asarray(labels).ravel()) <= 2
    for k in range(3):  # three classes: one 16-bit probability map each
        prob = Image.open(out / f"generated_000_prob_{k}.png")
        assert prob.mode.startswith("I") and np.asarray(prob).max() <= 65535
    assert Image.open(out / "generated_002_overlay.png").mode == "RGB"
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["mean_iou"] <= 1
    assert "mean_iou" in capsys.readouterr().out
    # scored inside a valid region only: a different pixel count, so (almost surely) other scores
    rc = main(["segment", "predict", str(checkpoint), str(data_dir / "images"), "--out", str(out / "fov"),
               "--masks", str(data_dir / "masks"), "--valid", str(data_dir / "fov")])
    inside = json.loads((out / "fov" / "metrics.json").read_text())
    assert rc == 0 and inside != metrics


def test_densify_check_prints_layers_and_difference(capsys):
    assert main(["densify", "--check", "--net", "toy", "--size", "20x17", "--pixels", "50"]) == 0
    out = capsys.readouterr().out
    assert "pool2" in out and "2x2" in out and "6x6" in out
    assert "max abs difference" in out and "OK" in out


def test_densify_check_on_a_checkpoint(checkpoint, capsys):
    assert main(["densify", "--check", "--checkpoint", str(checkpoint), "--size", "24x24"]) == 0
    assert "fc->conv" in capsys.readouterr().out


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_gives_one_error_line(checkpoint, data_dir, tmp_path, capsys):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(grey)
    assert "1 channels but the model takes 3" in _error(
        ["segment", "predict", str(checkpoint), str(grey), "--out", str(tmp_path / "o")], capsys)
    wrong = tmp_path / "masks"
    wrong.mkdir()
    Image.fromarray(np.zeros((12, 40), np.uint8)).save(wrong / "generated_000.png")
    assert "is (12, 40) but image" in _error(
        ["segment", "predict", str(checkpoint), str(data_dir / "images" / "generated_000.png"), "--out",
         str(tmp_path / "o2"), "--masks", str(wrong)], capsys)
    assert "does not exist" in _error(["segment", "predict", str(tmp_path / "none.safetensors"), str(grey),
                                       "--out", str(tmp_path / "o3")], capsys)
    assert "does not exist" in _error(["segment", "train", "--data", str(tmp_path / "nope"),
                                       "--out", str(tmp_path / "x.safetensors")], capsys)
    assert "--size" in _error(["densify", "--size", "big"], capsys)
    assert "patch net" in _error(["densify", "--net", "vgg"], capsys)
    assert "cannot take a 1-channel 40x40 patch" in _error(["densify", "--net", "membrane", "--patch", "40"],
                                                          capsys)


def test_unsupported_layer_is_one_error_line(monkeypatch, capsys):
    from torch import nn

    from cnnkit.dense import nets

    padded = lambda: (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 5), nn.Flatten()), 5)  # noqa: E731
    monkeypatch.setitem(nets.NETS, "padded", padded)
    assert "layer '0': zero padding inside the patch net" in _error(["densify", "--net", "padded"], capsys)
