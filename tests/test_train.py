"""End-to-end training: run folder, bit-exact resume, and every bad-input case of the CLI."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.cli import main
from cnnkit.train.checkpoint import load_checkpoint
from cnnkit.train.runner import TrainConfig, fit


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def quick(tmp_path, **kw):
    return TrainConfig(**{"out": str(tmp_path / "run"), "epochs": 2, "batch_size": 64, "lr": 0.05, **kw})


def test_training_writes_a_complete_run_folder(tmp_path):
    summary = fit(quick(tmp_path, epochs=3))
    out = tmp_path / "run"
    names = {p.name for p in out.iterdir()}
    assert {"args.json", "metrics.csv", "curves.png", "confusion.png", "best.safetensors",
            "last.safetensors"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["val_acc1"]) > 0.8  # LeNet-5 learns digits quickly
    assert summary["final"]["val_acc1"] == pytest.approx(float(rows[-1]["val_acc1"]))
    args = json.loads((out / "args.json").read_text())
    assert args["model"] == "lenet5" and args["seed"] == 0
    ckpt = load_checkpoint(out / "last.safetensors")
    assert ckpt.epoch == 3 and ckpt.classes == [str(i) for i in range(10)]
    assert ckpt.mean_image.shape == (1, 32, 32) and 0 < float(ckpt.mean_image.mean()) < 1


def test_resume_gives_identical_weights(tmp_path):
    straight = fit(quick(tmp_path / "a", epochs=3, dropout=0.3))
    fit(quick(tmp_path / "b", epochs=1, dropout=0.3))  # "interrupted" after epoch 1
    resumed = fit(quick(tmp_path / "b", epochs=3, dropout=0.3), resume=True)
    a = load_checkpoint(straight["last_checkpoint"]).model_state
    b = load_checkpoint(resumed["last_checkpoint"]).model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader(open(tmp_path / "b" / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_seed_makes_runs_repeat_bit_for_bit(tmp_path):
    a = fit(quick(tmp_path / "a", epochs=1, seed=7))
    b = fit(quick(tmp_path / "b", epochs=1, seed=7))
    sa, sb = (load_checkpoint(s["last_checkpoint"]).model_state for s in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cli_train_eval_predict(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "train", "--epochs", "2", "--out", out)
    assert code == 0 and "held-out top-1 accuracy" in stdout
    code, stdout, _ = run_cli(capsys, "eval", out / "best.safetensors", "--json", "--out", tmp_path / "ev")
    assert code == 0
    result = json.loads(stdout)
    assert result["images"] == 359 and result["acc1"] > 0.8
    assert (tmp_path / "ev" / "confusion.png").exists()
    # predict on a digit image written to disk
    from sklearn.datasets import load_digits

    d = load_digits()
    img = (d.images[0] / 16 * 255).astype(np.uint8)
    Image.fromarray(img).resize((32, 32), Image.BILINEAR).save(tmp_path / "digit.png")
    code, stdout, _ = run_cli(capsys, "predict", out / "best.safetensors", tmp_path / "digit.png", "--topk", "2")
    assert code == 0 and stdout.startswith(str(tmp_path / "digit.png"))
    assert len(stdout.split("\t")[1].split(",")) == 2


# --------------------------------------------------------------------------- bad input


def _class_folders(root, corrupt=False):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    if corrupt:
        (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


def test_missing_dataset(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(code, err, str(tmp_path / "nope"))
    assert not (tmp_path / "o").exists()  # no empty run folder left behind


def test_empty_dataset_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "empty", "--out", tmp_path / "o")
    assert_one_line_error(code, err, str(tmp_path / "empty"))


def test_corrupt_image_is_named_and_can_be_skipped(tmp_path, capsys):
    data = _class_folders(tmp_path / "data", corrupt=True)
    code, _, err = run_cli(capsys, "train", "--data", data, "--out", tmp_path / "o", "--epochs", "1")
    assert_one_line_error(code, err, "broken.jpg", "--skip-bad-files")
    assert not (tmp_path / "o" / "last.safetensors").exists()
    code, stdout, _ = run_cli(capsys, "train", "--data", data, "--out", tmp_path / "o", "--epochs", "1",
                              "--skip-bad-files", "--batch-size", "2")
    assert code == 0 and "held-out" in stdout


def test_unknown_model_and_option(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--model", "resnet9000", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "resnet9000", "cnnkit models")
    code, _, err = run_cli(capsys, "train", "--frobnicate", "3")
    assert_one_line_error(code, err, "--frobnicate")
    code, _, err = run_cli(capsys, "train", "--epochs", "0", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--epochs")


def test_checkpoint_from_another_model(tmp_path, capsys):
    out = tmp_path / "run"
    fit(quick(tmp_path, epochs=1))
    code, _, err = run_cli(capsys, "train", "--resume", "--model", "alexnet", "--out", out, "--epochs", "2")
    assert code == 2 and "Traceback" not in err and err.startswith("error: ")
    # a checkpoint whose weights do not fit the model it claims
    from cnnkit.train.checkpoint import save_checkpoint

    ckpt = load_checkpoint(out / "last.safetensors")
    ckpt.model_options = {"num_classes": 4}
    save_checkpoint(tmp_path / "wrong.safetensors", ckpt)
    code, _, err = run_cli(capsys, "eval", tmp_path / "wrong.safetensors")
    assert_one_line_error(code, err, "does not fit")


def test_malicious_checkpoint_via_cli(tmp_path, capsys):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps(Evil()))
    code, _, err = run_cli(capsys, "eval", tmp_path / "evil.safetensors")
    assert_one_line_error(code, err, "not a cnnkit checkpoint")
    assert not marker.exists()


def test_nan_loss_stops_with_a_clear_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--lr", "1e30", "--epochs", "1", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "loss became", "--lr")
    assert not (tmp_path / "o" / "last.safetensors").exists()


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "train", "--out", blocker / "run")
    assert_one_line_error(code, err, "not writable", "--out")


def test_resume_without_a_checkpoint_starts_the_run(tmp_path):
    # a run killed before its first checkpoint is resumed by the same command + --resume
    summary = fit(quick(tmp_path, epochs=1), resume=True, progress=False)
    assert summary["epochs"] == 1 and load_checkpoint(tmp_path / "run" / "last.safetensors").epoch == 1


def test_error_from_a_dataloader_worker_is_one_line():
    from cnnkit.cli import one_line
    from cnnkit.errors import DataError

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                        "call last):\n  File \"x.py\", line 1\ncnnkit.errors.DataError: cannot decode image a.png")
    assert one_line(wrapped) == "cannot decode image a.png"


def test_demo_runs_both_stages(tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "demo", "--epochs", "2", "--out", tmp_path / "demo")
    assert code == 0
    assert "[1] LeNet-5" in stdout and "held-out top-1 accuracy" in stdout
    assert "[2] pixelwise" in stdout and "max |difference|" in stdout
    assert (tmp_path / "demo" / "pixelwise" / "pixelwise_demo.png").stat().st_size > 1000
    code, stdout, _ = run_cli(capsys, "demo", "--epochs", "1", "--out", tmp_path / "d2", "--skip-pixelwise")
    assert code == 0 and "[2]" not in stdout


def test_threads_option(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        code, _, err = run_cli(capsys, "train", "--threads", "0", "--out", tmp_path / "o")
        assert_one_line_error(code, err, "--threads")
        code, _, _ = run_cli(capsys, "train", "--threads", "1", "--epochs", "1", "--out", tmp_path / "o")
        assert code == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
