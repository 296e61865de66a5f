"""`cnnkit segment train|predict` and `cnnkit densify`: outputs, and one-line errors with status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.cli import main
from cnnkit.segmentation.data import generate_textured_shapes

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True, scope="module")
def _default_malloc():
    """The command tunes glibc malloc for its own process; leave pytest's alone."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("cnnkit.cli.dense.retain_freed_memory", lambda: False)  # densify, run in-process here
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
    out = tmp_path_factory.mktemp("ckpt") / "run"
    done = cnnkit("segment", "train", "--data", str(data_dir), "--valid", "fov", "--val-fraction", "0.34",
                  "--epochs", "2", "--option", "width=4", "--option", "patch=18", "--crop", "16", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "best.safetensors").is_file()
    return out / "best.safetensors"


def cnnkit(*args, timeout=240) -> subprocess.CompletedProcess:
    """The command as a user runs it: a fresh process, a clean environment."""
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "cnnkit", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_train_on_generated_data(tmp_path):
    done = cnnkit("segment", "train", "--generated-count", "4", "--epochs", "1", "--option", "width=4",
                  "--option", "patch=16", "--out", str(tmp_path / "g"))
    assert done.returncode == 0, done.stderr
    assert "held-out after epoch 1: pixel accuracy" in done.stdout and done.stderr == ""
    assert (tmp_path / "g" / "best.safetensors").is_file()


def test_predict_and_eval_a_trained_checkpoint(checkpoint, data_dir, tmp_path):
    out = tmp_path / "pred"
    done = cnnkit("segment", "predict", str(checkpoint), "--images", str(data_dir / "images"), "--out", str(out),
                  "--max-memory", "64", "--no-tta")
    assert done.returncode == 0, done.stderr
    # trained with --valid, predicted without: one warning line on stderr, the outputs still written
    assert done.stderr.startswith("warning: the checkpoint was trained with valid-region masks")
    assert done.stderr.count("\n") == 1
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"generated_00{i}_{kind}.png" for i in range(3) for kind in ("labels", "overlay",
                                                                                            "prob_0", "prob_1",
                                                                                            "prob_2"))
    labels = np.asarray(Image.open(out / "generated_000_labels.png"))
    assert labels.shape == (40, 40) and labels.max() <= 2
    done = cnnkit("segment", "eval", str(checkpoint), "--data", str(data_dir), "--valid", "fov", "--no-tta",
                  "--mask-mode", "index", "--threads", "1", "--out", str(tmp_path / "m.json"))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= metrics["pixel_accuracy"] <= 1 and len(metrics["per_class_iou"]) == 3
    assert metrics["pixels"] == 3 * 30 * 30  # only the valid region is scored


def test_densify_check_prints_layers_and_difference(capsys):
    assert main(["densify", "--check", "--net", "toy", "--size", "20x17", "--pixels", "50"]) == 0
    out = capsys.readouterr().out
    assert "pool2" in out and "2x2" in out and "6x6" in out
    assert "max abs difference" in out and "OK" in out


def test_densify_check_on_a_checkpoint(checkpoint, capsys):
    assert main(["densify", "--check", "--checkpoint", str(checkpoint), "--size", "24x24"]) == 0
    assert "fc->conv" in capsys.readouterr().out


def _error(argv, capsys=None) -> str:
    done = cnnkit(*argv)
    assert done.returncode == 2, done.stderr
    err = done.stderr
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_bad_input_gives_one_error_line(checkpoint, data_dir, tmp_path, capsys):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(grey)
    assert "1 channel" in _error(["segment", "predict", str(checkpoint), "--images", str(grey), "--out",
                                  str(tmp_path / "o")])
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    assert "does not exist" in _error(["segment", "predict", str(tmp_path / "none.safetensors"), "--images",
                                       str(grey), "--out", str(tmp_path / "o3")])
    assert "does not exist" in _error(["segment", "train", "--data", str(tmp_path / "nope"),
                                       "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    assert "--size" in _error(["densify", "--size", "big"], capsys)
    assert "patch net" in _error(["densify", "--net", "vgg"], capsys)
    assert "cannot take a 1-channel 40x40 patch" in _error(["densify", "--net", "ciresan_n3", "--patch", "40"],
                                                          capsys)
    assert "not a patch net" in _error(["densify", "--net", "lenet5"], capsys)
    assert "cannot import 'no_such_module'" in _error(["densify", "--net", "no_such_module:build"], capsys)


def test_unsupported_layer_is_one_error_line(monkeypatch, tmp_path, capsys):
    (tmp_path / "cli_padded_net.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 5), nn.Flatten()), 5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "cnnkit", "densify", "--net", "cli_padded_net:build"],
                          env={"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}:{tmp_path}"},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "layer '0': zero padding inside the patch net" in done.stderr
