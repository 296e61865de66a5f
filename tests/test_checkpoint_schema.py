"""Crafted checkpoint metadata: one ``error:`` line naming the file and exit status 2, never a traceback,
never a model built (or allocated) before its metadata and size are checked.

Two real checkpoints are trained once per module (1 epoch of classification, 1 of segmentation); each
case rewrites one field of a copy's JSON document. Most cases run the command in-process; a few run the
installed command in a fresh process, as a user does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from cnnkit.cli import main
from cnnkit.errors import CheckpointError, ConfigError
from cnnkit.segmentation.task import SegmentationTask, SegmentConfig
from cnnkit.train.checkpoint import Checkpoint, load_checkpoint
from cnnkit.train.runner import TrainConfig, fit

SRC = str(Path(__file__).resolve().parents[1] / "src")
DELETE = object()
RAW = "<raw metadata>"  # an edit of this key replaces the whole 'cnnkit' metadata string
LISKOWSKI_HUGE = {"num_classes": 3, "in_chans": 3, "width": 1e5}  # 6.4M channels a layer: 4e14 parameters


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real checkpoints: lenet5 on digits (last.safetensors: optimiser, scheduler and RNG states too) and
    the `segment` patch net on generated images; a folder with one image and its mask."""
    root = tmp_path_factory.mktemp("runs")
    fit(TrainConfig(out=str(root / "c"), epochs=1, batch_size=64, lr=0.05), progress=False)
    fit(SegmentConfig(out=str(root / "s"), epochs=1, generated_count=4, model_options={"width": 4, "patch": 18},
                      crop=16, batch_size=4), progress=False, task=SegmentationTask())
    for sub in ("images", "masks"):
        (root / "data" / sub).mkdir(parents=True)
    Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(root / "data" / "images" / "a.png")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(root / "data" / "masks" / "a.png")
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(root / "digit.png")
    return {"classify": root / "c" / "last.safetensors", "segment": root / "s" / "last.safetensors",
            "data": root / "data", "digit": root / "digit.png"}


def craft(src: Path, dst: Path, edits: dict) -> Path:
    """A copy of checkpoint ``src`` whose metadata fields (dotted paths) get new values (DELETE: removed;
    the key RAW: the whole metadata string)."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        doc = json.loads(f.metadata()["cnnkit"])
    for field, value in edits.items():
        *parents, last = field.split(".")
        obj = doc
        for p in parents:
            obj = obj[p]
        if value is DELETE:
            del obj[last]
        elif field != RAW:
            obj[last] = value
    save_file(tensors, str(dst), metadata={"cnnkit": edits.get(RAW, json.dumps(doc))})
    return dst


# (metadata edits, what the error line says); the line always names the file too
CLASSIFY = [
    ({RAW: "{not json"}, "metadata is not JSON"),
    ({RAW: "[1, 2]"}, "must be a JSON object, found [1, 2]"),
    ({"format": DELETE}, "not a cnnkit checkpoint"),
    ({"model_name": DELETE}, "metadata field 'model_name' is missing"),
    ({"model_name": 3}, "'model_name' must be a non-empty string"),
    ({"model_options": DELETE}, "metadata field 'model_options' is missing"),
    ({"model_options": [1, 2]}, "'model_options' must be an object, found [1, 2]"),
    ({"model_options.num_classes": {"a": 1}}, "'model_options.num_classes' must be a number"),
    ({"model_options.num_classes": -5}, "cannot be built with its options (RuntimeError"),
    ({"model_options.num_classes": 11}, "does not fit this model (lenet5): parameter 'classifier.output.weight'"),
    ({"model_options.num_classes": 10**400}, "'model_options.num_classes' must be a number"),
    ({"model_name": "vgg_e", "meta.config.model": "vgg_e"},  # 129M parameters: under the limit, other shapes
     "does not fit this model (vgg_e): it lacks parameter 'features.conv1_1.weight' (64x1x3x3)"),
    ({"model_name": "vgg_e", "model_options.num_classes": 10**9}, "has 4,097,139,569,088 parameters, above the "
     "limit of 2,000,000,000; the file is damaged or was not written by cnnkit, or pass `cnnkit --max-params "),
    ({"model_name": "no_such_net"}, "cannot be built: unknown model 'no_such_net'"),
    ({"classes": 7}, "'classes' must be a non-empty list of strings, found 7"),
    ({"classes": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}, "'classes' must be a non-empty list of strings"),
    ({"classes": []}, "'classes' must be a non-empty list of strings"),
    ({"classes": ["a", "b"]}, "has 10 outputs (model_options.num_classes) but it names 2 classes"),
    ({"epoch": "abc"}, "metadata field 'epoch' must be a non-negative integer, found \"abc\""),
    ({"epoch": -1}, "'epoch' must be a non-negative integer"),
    ({"epoch": DELETE}, "'epoch' is missing"),
    ({"meta": DELETE}, "'meta' is missing"),
    ({"meta": []}, "'meta' must be an object"),
    ({"meta.task": 5}, "'meta.task' must be a string"),
    ({"meta.config": "abc"}, "'meta.config' must be an object, found \"abc\""),
    ({"meta.config.seed": "x"}, "'meta.config.seed' must be a whole number"),
    ({"meta.config.val_fraction": 5}, "'meta.config.val_fraction' must be a number in [0, 1)"),
    ({"meta.config.l2_features": "yes"}, "'meta.config.l2_features' must be true or false"),
    ({"meta.config.lr_steps": 5}, "'meta.config.lr_steps' must be a list of [first_epoch, factor] pairs"),
    ({"meta.config.model": "vgg_e"}, "'meta.config.model' must be the model the file holds"),
    ({"meta.config.model_options": {"channels": 10**7}}, "'meta.config.model_options.channels' must be the model's"),
    ({"meta.input_size": DELETE}, "metadata field 'meta.input_size' is missing"),
    ({"meta.input_size": [-3, 32]}, "'meta.input_size' must be a [height, width] list of two integers in 1..16384"),
    ({"meta.input_size": [10**6, 10**6]}, "'meta.input_size' must be a [height, width] list"),
    ({"meta.input_size": [16, 16]}, "mean image must be 1x16x16 floats"),
    ({"meta.load_size": "32"}, "'meta.load_size' must be a [height, width] list"),
    ({"meta.channels": 0}, "'meta.channels' must be an integer in 1..4096"),
    ({"meta.channels": 3}, "mean image must be 3x32x32 floats"),
    ({"meta.history": [1, 2]}, "'meta.history' must be a list of objects"),
    ({"meta.n_averaged": -1}, "'meta.n_averaged' must be a non-negative integer"),
    ({"optimizer": []}, "'optimizer' must be an object"),
    ({"optimizer.state": DELETE}, "'optimizer.state' is missing"),
    ({"optimizer.state.0.momentum_buffer": {"tensor": "optim/9/nothing"}}, "'optimizer.state.0.momentum_buffer'"),
    ({"optimizer.param_groups": [{"params": "all"}]}, "'optimizer.param_groups' must be a list of objects"),
    ({"scheduler": "x"}, "'scheduler' must be an object"),
    ({"scheduler.last_epoch": "x"}, "'scheduler.last_epoch' must be an integer"),
    ({"rng": 1}, "'rng' must be an object"),
    ({"rng.numpy": "x"}, "'rng.numpy' must be [\"MT19937\""),
    ({"rng.python": [3, [1, 2], None]}, "'rng.python' must be [3, 625 integers"),
]

SEGMENT = [
    ({"model_options.width": 10**7}, "above the limit of 2,000,000,000"),
    ({"model_options.patch": 5}, "cannot be built: patch net 'segment' needs patch >= 16"),
    ({"model_options.width": 8}, "does not fit this model (segment): parameter 'conv1a.weight' is stored as 4x3x3x3"),
    ({"model_name": "liskowski"}, "its model 'liskowski' cannot be built: bad option for model 'liskowski'"),
    ({"model_name": "liskowski", "meta.config.model": "liskowski", "model_options": LISKOWSKI_HUGE},
     "above the limit"),
    ({"model_name": "liskowski", "meta.config.model": "liskowski", "meta.config.model_options": {},
      "model_options": {"num_classes": 3, "in_chans": 3}}, "does not fit this model (liskowski)"),
    ({"model_name": "mynets:evil"}, "'meta.config.model' must be the model the file holds, \"mynets:evil\""),
    ({"model_name": "mynets:evil", "meta.config.model": "mynets:evil"}, "builds its net by importing 'mynets:evil'"),
    ({"meta.patch": "abc"}, "'meta.patch' must be a [height, width] list of two integers in 1..16384"),
    ({"meta.patch": [-18, -18]}, "'meta.patch' must be a [height, width] list"),
    ({"meta.patch": DELETE}, "lacks patch in its metadata"),
    ({"meta.border": "wrap"}, "'meta.border' must be one of \"zeros\", \"reflect\", \"replicate\""),
    ({"meta.preprocess": "image"}, "'meta.preprocess' must be an object"),
    ({"meta.preprocess.normalize": "zzz"}, "'meta.preprocess.normalize' must be one of \"image\", \"none\""),
    ({"meta.preprocess.evil": 1}, "'meta.preprocess.evil' is not one cnnkit writes"),
    ({"meta.threshold": 2.0}, "'meta.threshold' must be a number in [0, 1] or null, found 2.0"),
    ({"meta.threshold": "x"}, "'meta.threshold' must be a number in [0, 1] or null"),
    ({"meta.positive_class": 5}, "'meta.positive_class' must be a class index below 3, found 5"),
    ({"meta.positive_class": "1"}, "'meta.positive_class' must be a non-negative integer"),
    ({"meta.palette": [[300, 0, 0]]}, "'meta.palette' must be a list of [r, g, b] lists"),
    ({"meta.ignore_value": -1}, "'meta.ignore_value' must be an integer in 0..65535 or null"),
    ({"meta.mask_mode": 3}, "'meta.mask_mode' must be one of"),
    ({"meta.symmetries": []}, "'meta.symmetries' must be a non-empty list of integers in 0..7"),
    ({"meta.symmetries": [9]}, "'meta.symmetries' must be a non-empty list of integers in 0..7"),
    ({"meta.layouts": []}, "'meta.layouts' must be an object of strings"),
    ({"meta.config.palette": "red"}, "'meta.config.palette' must be a list of [r, g, b] lists"),
    ({"meta.config.crop": "big"}, "'meta.config.crop' must be a whole number"),
]


def _ids(cases):
    return [",".join(f"{k}={json.dumps(v, default=lambda _: 'DELETE')[:20]}" for k, v in edits.items())
            for edits, _ in cases]


def run_main(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, err


def assert_refused(code: int, err: str, path: Path, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert str(path) in lines[0], lines[0]
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(("edits", "fragment"), CLASSIFY, ids=_ids(CLASSIFY))
def test_crafted_classification_checkpoint(runs, tmp_path, capsys, edits, fragment):
    ckpt = craft(runs["classify"], tmp_path / "crafted.safetensors", edits)
    code, err = run_main(capsys, "eval", ckpt, "--out", tmp_path / "eval")
    assert_refused(code, err, ckpt, fragment)
    assert not (tmp_path / "eval").exists()
    code, err = run_main(capsys, "predict", ckpt, runs["digit"])
    assert_refused(code, err, ckpt, fragment)


@pytest.mark.parametrize(("edits", "fragment"), SEGMENT, ids=_ids(SEGMENT))
def test_crafted_segmentation_checkpoint(runs, tmp_path, capsys, edits, fragment):
    ckpt = craft(runs["segment"], tmp_path / "crafted.safetensors", edits)
    code, err = run_main(capsys, "segment", "predict", ckpt, "--images", runs["data"] / "images",
                         "--out", tmp_path / "labels")
    assert_refused(code, err, ckpt, fragment)
    assert not (tmp_path / "labels").exists()


def test_the_real_checkpoints_pass(runs, capsys):
    """The checks refuse crafted files only: both real runs load, build and run."""
    code, err = run_main(capsys, "predict", runs["classify"], runs["digit"])
    assert code == 0, err
    code, err = run_main(capsys, "segment", "eval", runs["segment"], "--data", runs["data"], "--no-tta")
    assert code == 0, err


def test_models_of_refused_checkpoints_are_only_built_on_the_meta_device(runs, tmp_path, monkeypatch):
    import cnnkit.models
    import cnnkit.models.patch

    devices = []

    def recording(create):
        def create_and_record(name, **options):
            devices.append(torch.get_default_device().type)
            return create(name, **options)
        return create_and_record

    for module in (cnnkit.models, cnnkit.models.patch):
        monkeypatch.setattr(module, "create", recording(module.create))
    # VGG-E with 10^9 classes: 4e12 parameters (16 TB); the stored tensors are lenet5's
    vgg = craft(runs["classify"], tmp_path / "vgg.safetensors", {"model_name": "vgg_e",
                                                                 "model_options.num_classes": 10**9})
    with pytest.raises(CheckpointError, match="has 4,097,139,569,088 parameters, above the limit"):
        load_checkpoint(vgg)
    ckpt = load_checkpoint(runs["classify"])
    ckpt.model_name, ckpt.model_options = "vgg_e", {"num_classes": 10**9}  # built in memory, not loaded
    with pytest.raises(CheckpointError, match="above the limit"):
        ckpt.build_model()
    assert devices == ["meta"] * 3  # the refused file, the real one's check at load, the in-memory one


def test_the_parameter_limit_can_be_changed(runs, monkeypatch):
    monkeypatch.setenv("CNNKIT_MAX_PARAMS", "1e4")  # lenet5 has 61,706
    with pytest.raises(CheckpointError, match=r"has 61,706 parameters, above the limit of 10,000; .* "
                                              r"set CNNKIT_MAX_PARAMS=61706\) if you trust it"):
        load_checkpoint(runs["classify"])
    monkeypatch.setenv("CNNKIT_MAX_PARAMS", "61706")
    assert load_checkpoint(runs["classify"]).build_model() is not None
    monkeypatch.setenv("CNNKIT_MAX_PARAMS", "lots")
    with pytest.raises(ConfigError, match="CNNKIT_MAX_PARAMS must be a positive number"):
        load_checkpoint(runs["classify"])


def test_an_in_memory_checkpoint_is_checked_before_it_is_built():
    from cnnkit.models import create

    state = create("lenet5").state_dict()
    ckpt = Checkpoint(model_name="lenet5", model_options={"num_classes": 12}, model_state=state,
                      classes=[str(i) for i in range(12)])
    with pytest.raises(CheckpointError, match=r"parameter 'classifier.output.weight' is stored as 10x84 but the "
                                              r"model's is 12x84"):
        ckpt.build_model()


# --------------------------------------------------------------------------- as a user runs them


def cnnkit(*args) -> subprocess.CompletedProcess:
    """The installed command in a fresh process with a clean environment."""
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "cnnkit", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(("kind", "edits", "command", "fragment"), [
    ("classify", {"model_name": "vgg_e", "model_options.num_classes": 10**9},  # 4e12 parameters
     ["eval", "{ckpt}", "--out", "{out}"], "above the limit"),
    ("classify", {RAW: "{not json"}, ["predict", "{ckpt}", "{digit}"], "metadata is not JSON"),
    ("segment", {"model_options.width": 10**7}, ["segment", "predict", "{ckpt}", "--images", "{images}",
                                                 "--out", "{out}"], "above the limit"),
    ("segment", {"meta.threshold": 2.0}, ["segment", "eval", "{ckpt}", "--data", "{data}", "--out", "{out}/m.json"],
     "'meta.threshold' must be a number in [0, 1] or null"),
    ("segment", {"model_name": "liskowski", "meta.config.model": "liskowski", "model_options": LISKOWSKI_HUGE},
     ["densify", "--checkpoint", "{ckpt}", "--check"], "above the limit"),
], ids=["eval", "predict", "segment-predict", "segment-eval", "densify"])
def test_the_command_refuses_a_crafted_checkpoint(runs, tmp_path, kind, edits, command, fragment):
    ckpt = craft(runs[kind], tmp_path / "crafted.safetensors", edits)
    names = {"ckpt": ckpt, "out": tmp_path / "out", "digit": runs["digit"], "data": runs["data"],
             "images": runs["data"] / "images"}
    done = cnnkit(*[part.format(**names) for part in command])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert str(ckpt) in lines[0] and fragment in lines[0], lines[0]
    assert done.stdout == ""
    assert not (tmp_path / "out").exists()


def test_the_limit_is_a_flag_of_the_command(runs, tmp_path):
    done = cnnkit("--max-params", "1e4", "eval", str(runs["classify"]), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "has 61,706 parameters, above the limit of 10,000" in done.stderr
    assert "cnnkit --max-params 61706" in done.stderr and not (tmp_path / "out").exists()
    done = cnnkit("--max-params", "61706", "eval", str(runs["classify"]), "--json")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("value", ["0.5", "0", "inf", "abc"])
def test_a_bad_limit_names_the_flag(value):
    done = cnnkit("--max-params", value, "summary", "lenet5")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"error: argument --max-params: {value!r} is not a number of parameters >= 1 "
                           "(e.g. 5e9) (see `cnnkit --help`)\n")
