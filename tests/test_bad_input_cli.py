"""Bad input as users met it (issue 11): every command answers with exactly one line ``error: ...`` on stderr
that names the input, exit status 2, no traceback, and leaves no new file or folder behind.

Each test runs the command as a user does: a fresh ``python -m cnnkit`` process with a clean environment.
A full disk is real: the process runs with ``RLIMIT_FSIZE`` lowered, so that its writes fail with EFBIG
exactly where a full disk fails them with ENOSPC (in Python's, Pillow's, matplotlib's and safetensors'
own writers).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.cli import argtypes, build_parser
from cnnkit.segmentation.data import generate_textured_shapes

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
TINY_SEGMENT = ["--epochs", "1", "--option", "width=4", "--option", "patch=18", "--crop", "16"]


def cnnkit(*args, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """``python -m cnnkit ARGS``; with ``max_file_bytes`` no file it writes can grow beyond that (a full disk)."""
    env, preexec = dict(ENV), None
    if max_file_bytes is not None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # a cut-off .pyc would break every later import of the module

        def preexec():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, "-m", "cnnkit", *map(str, args)], env=env, preexec_fn=preexec,
                          capture_output=True, text=True, timeout=240)


def refused(done: subprocess.CompletedProcess, *names) -> str:
    """The one error line, after checking the status and that it names every input in ``names``."""
    err = done.stderr
    assert done.returncode == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in err, err
    return err.strip()


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def warm_caches():
    """matplotlib's font cache, built once outside the file-size limit (a command run under the limit must
    fail where the test means it to, not while writing a cache)."""
    subprocess.run([sys.executable, "-c", "import matplotlib.pyplot"], env=ENV, check=True, timeout=240)


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A valid PNG header declaring ``width`` x ``height`` RGB pixels, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def write_idx(path: Path, dims: tuple[int, ...], payload: bytes = b"") -> None:
    path.write_bytes(bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + payload)


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> Path:
    """images/*.png and masks/*.png (3 classes), 24x24."""
    root = tmp_path_factory.mktemp("seg")
    for sub in ("images", "masks"):
        (root / sub).mkdir()
    for s in generate_textured_shapes(3, size=24, seed=5):
        Image.fromarray((s.image.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)).save(
            root / "images" / f"{s.name}.png")
        Image.fromarray(s.target.numpy().astype(np.uint8)).save(root / "masks" / f"{s.name}.png")
    return root


@pytest.fixture(scope="module")
def seg_checkpoint(seg_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("segrun") / "run"
    done = cnnkit("segment", "train", "--data", seg_data, *TINY_SEGMENT, "--out", out)
    assert done.returncode == 0, done.stderr
    return out / "best.safetensors"


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory) -> Path:
    """A tiny MNIST: 20 random 28x28 images of two classes, as IDX files."""
    root = tmp_path_factory.mktemp("idx")
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    write_idx(root / "train-images-idx3-ubyte", (20, 28, 28), images.tobytes())
    write_idx(root / "train-labels-idx1-ubyte", (20,), (np.arange(20) % 2).astype(np.uint8).tobytes())
    return root


@pytest.fixture(scope="module")
def checkpoint(idx_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    done = cnnkit("train", "--data", idx_data, "--epochs", "1", "--out", out)
    assert done.returncode == 0, done.stderr
    return out / "best.safetensors"


def copy_dataset(src: Path, dst: Path) -> Path:
    for f in src.rglob("*.png"):
        (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        (dst / f.relative_to(src)).write_bytes(f.read_bytes())
    return dst


# --------------------------------------------------------------------------- data


def test_idx_file_with_zero_items(tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    write_idx(data / "train-images-idx3-ubyte", (0, 28, 28))
    write_idx(data / "train-labels-idx1-ubyte", (0,))
    before = files_under(tmp_path)
    err = refused(cnnkit("train", "--data", data, "--out", tmp_path / "run"), "train-images-idx3-ubyte")
    assert "holds no data" in err
    assert files_under(tmp_path) == before


def test_idx_dimensions_that_overflow_or_disagree_with_the_file_size(tmp_path):
    from cnnkit.data.mnist import read_idx
    from cnnkit.errors import DataError

    write_idx(tmp_path / "huge", (2**31, 2**31, 4))  # 2^64 values: 0 in int64, as many as the file holds
    write_idx(tmp_path / "short", (2, 28, 28), bytes(100))
    write_idx(tmp_path / "long", (1, 2, 2), bytes(5))
    with pytest.raises(DataError, match=rf"huge is truncated \(16 bytes, header \(2147483648, 2147483648, 4\) "
                                        rf"needs {16 + 2**64}\)"):
        read_idx(tmp_path / "huge")
    with pytest.raises(DataError, match=r"short is truncated \(116 bytes, header \(2, 28, 28\) needs 1584\)"):
        read_idx(tmp_path / "short")
    with pytest.raises(DataError, match="long is longer than its header says"):
        read_idx(tmp_path / "long")


@pytest.mark.parametrize("command, setting, named", [
    ("train", 'momentum = "high"\n', 'settings.toml: momentum = "high" must be a number (e.g. momentum = 0.9)'),
    ("segment train", "palette = [[1, 2]]\n", "--palette must be colours [[r, g, b], ...]"),
], ids=["momentum", "palette"])
def test_config_file_with_a_value_of_the_wrong_type(tmp_path, command, setting, named):
    config = tmp_path / "settings.toml"
    config.write_text(setting)
    before = files_under(tmp_path)
    refused(cnnkit(*command.split(), "--config", config, "--out", tmp_path / "run"), named)
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("setting, named", [
    ("epochs = 2.5", "epochs = 2.5 must be a whole number (e.g. epochs = 20)"),
    ("lr = true", "lr = true must be a number"),
    ("data = 3", "data = 3 must be a string in quotes"),
    ("input_size = true", 'input_size = true must be a size (32 or "32x48")'),
    ("model_options = 4", "model_options = 4 must be a table"),
])
def test_config_file_types_are_checked_when_read(tmp_path, setting, named):
    from cnnkit.errors import ConfigError
    from cnnkit.train.config import read_config_file

    (tmp_path / "c.toml").write_text(setting + "\n")
    with pytest.raises(ConfigError) as info:
        read_config_file(tmp_path / "c.toml")
    assert str(info.value).startswith(f"{tmp_path / 'c.toml'}: {named}")


@pytest.mark.parametrize("command, damage", [("train", "garbage"), ("predict", "truncated")])
def test_segment_commands_refuse_a_corrupt_image(seg_data, seg_checkpoint, tmp_path, command, damage):
    data = copy_dataset(seg_data, tmp_path / "data")
    bad = data / "images" / "generated_000.png"  # the first: predict has written nothing yet
    good = bad.read_bytes()
    bad.write_bytes(b"not a PNG at all\n" * 8 if damage == "garbage" else good[: len(good) // 2])
    before = files_under(tmp_path)
    out = tmp_path / "out"
    argv = {"train": ["segment", "train", "--data", data, *TINY_SEGMENT, "--out", out],
            "predict": ["segment", "predict", seg_checkpoint, "--images", data / "images", "--out", out, "--no-tta"]}
    err = refused(cnnkit(*argv[command]), bad)
    assert ("cannot identify image file" if damage == "garbage" else "truncated") in err
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("command", ["segment predict", "predict"])
def test_decompression_bomb_is_refused_naming_the_file_and_how_to_allow_it(seg_checkpoint, checkpoint, tmp_path,
                                                                          command):
    if command == "segment predict":  # 68 bytes of PNG header, 30 GB decoded: above Pillow's error limit
        image, pixels = write_png_header(tmp_path / "bomb.png", 100_000, 100_000), 10**10
        argv = ["segment", "predict", seg_checkpoint, "--images", image, "--out", tmp_path / "out"]
    else:  # between Pillow's two limits Pillow only warns (a second stderr line) and decodes 100 M pixels
        image, pixels = write_png_header(tmp_path / "big.png", 10_000, 10_000), 10**8
        argv = ["predict", checkpoint, image]
    before = files_under(tmp_path)
    refused(cnnkit(*argv), image, f"{pixels} pixels", f"CNNKIT_MAX_IMAGE_PIXELS={pixels}")
    assert files_under(tmp_path) == before


def test_the_pixel_limit_can_be_raised_as_the_message_says(tmp_path, monkeypatch):
    from cnnkit.data.images import open_image
    from cnnkit.errors import ConfigError, DataError

    big = write_png_header(tmp_path / "big.png", 10_000, 10_000)
    with pytest.raises(DataError, match="CNNKIT_MAX_IMAGE_PIXELS=100000000"):
        with open_image(big):
            pass
    monkeypatch.setenv("CNNKIT_MAX_IMAGE_PIXELS", "100000000")
    with open_image(big) as image:
        assert image.size == (10_000, 10_000)  # opened; no pixel is decoded
    monkeypatch.setenv("CNNKIT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ConfigError, match="CNNKIT_MAX_IMAGE_PIXELS='lots' is not a positive whole number"):
        with open_image(big):
            pass


@pytest.mark.parametrize("command", ["train", "eval"])
def test_mask_values_beyond_the_classes(seg_data, seg_checkpoint, tmp_path, command):
    data = copy_dataset(seg_data, tmp_path / "data")
    mask = data / "masks" / "generated_001.png"
    values = np.array(Image.open(mask))
    values[0, 0] = 7
    Image.fromarray(values).save(mask)
    out = tmp_path / "out"
    argv = {"train": ["segment", "train", "--data", data, "--classes", "3", *TINY_SEGMENT, "--out", out],
            "eval": ["segment", "eval", seg_checkpoint, "--data", data, "--no-tta", "--out", out / "scores.json"]}
    before = files_under(tmp_path)
    refused(cnnkit(*argv[command]), mask, "value 7", "--ignore-value 7")
    assert files_under(tmp_path) == before


# --------------------------------------------------------------------------- flags

BAD_FLAGS = [
    (["segment", "train", "--epochs", "0"], "argument --epochs: '0' is not a positive whole number"),
    (["segment", "train", "--lr", "nan"], "argument --lr: 'nan' is not a positive number"),
    (["eval", "x.safetensors", "--batch-size", "0"], "argument --batch-size: '0' is not a positive whole number"),
    (["densify", "--patch", "0"], "argument --patch: '0' is not a positive whole number"),
    (["densify", "--pixels", "-1"], "argument --pixels: '-1' is not a positive whole number"),
    (["segment", "train", "--palette", "255,0"], "argument --palette: '255,0' is not 'r,g,b;r,g,b;...'"),
    (["train", "--momentum", "1.5"], "argument --momentum: '1.5' is not a fraction in [0, 1)"),
    (["train", "--seed", "-1"], "argument --seed: '-1' is not a whole number in [0, 2^32)"),
    (["segment", "predict", "x.safetensors", "--images", "x", "--out", "o", "--max-memory", "-4"],
     "argument --max-memory: '-4' is not a positive number"),
]


@pytest.mark.parametrize("argv, named", BAD_FLAGS, ids=[a[-2].lstrip("-") for a, _ in BAD_FLAGS])
def test_bad_flag_values_are_refused_when_parsed(argv, named, capsys):
    # the parser alone (a fresh process per flag would cost seconds each): what it prints is what a user sees,
    # argparse's line without the usage dump; the next test runs one in a fresh process
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.startswith(f"error: {named}") and err.count("\n") == 1, err


def test_an_infinite_learning_rate_is_refused_before_anything_starts(tmp_path):
    # the data does not exist either: the flag is checked before any data is read or any folder made
    err = refused(cnnkit("train", "--lr", "inf", "--data", tmp_path / "no_such_data", "--out", tmp_path / "run"),
                  "argument --lr: 'inf' is not a positive number")
    assert err.endswith("(see `cnnkit train --help`)")
    assert not any(tmp_path.iterdir())


def _every_option(parser: argparse.ArgumentParser, prog: str = "cnnkit"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _every_option(sub, f"{prog} {name}")
        elif action.option_strings:
            yield prog, action


def test_every_numeric_flag_checks_its_value_when_parsed():
    """A plain int or float lets 0, negative counts, nan and inf through, to fail later (after a folder was made,
    or as a traceback): every numeric flag of every command takes one of the checked types of cli.argtypes."""
    options = list(_every_option(build_parser()))
    unchecked = [f"{prog} {action.option_strings[-1]}" for prog, action in options if action.type in (int, float)]
    assert unchecked == []
    numeric = [action.type for _, action in options if getattr(action.type, "__module__", "") == argtypes.__name__]
    assert len(numeric) >= 60
    for parse in set(numeric) - {argtypes.seed}:
        for text in ("nan", "inf", "-inf", "-1", "x"):
            with pytest.raises(argparse.ArgumentTypeError):
                parse(text)
    for text in ("-1", str(2**32), "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            argtypes.seed(text)
    assert argtypes.interval("(0, 1]")("1") == 1.0 and argtypes.seed("0") == 0


# --------------------------------------------------------------------------- file system


def test_disk_full_during_train_leaves_no_run_folder(idx_data, tmp_path, warm_caches):
    # args.json and config.toml fit; the first checkpoint (safetensors' Rust writer) does not
    run = tmp_path / "run"
    refused(cnnkit("train", "--data", idx_data, "--epochs", "1", "--out", run, max_file_bytes=20_000),
            run / "last.safetensors", "File too large")
    assert not any(tmp_path.iterdir())


def test_disk_full_in_an_existing_folder_takes_back_the_runs_files(idx_data, tmp_path, warm_caches):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    refused(cnnkit("train", "--data", idx_data, "--epochs", "1", "--out", run, max_file_bytes=20_000),
            run / "last.safetensors", "File too large")
    assert sorted(p.name for p in run.iterdir()) == [".lock", "notes.txt"]  # the lock file stays (see RunLock)


def test_disk_full_during_segment_train_leaves_no_run_folder(seg_data, tmp_path, warm_caches):
    run = tmp_path / "runs" / "seg" / "run"  # nor the parent folders made for it
    refused(cnnkit("segment", "train", "--data", seg_data, *TINY_SEGMENT, "--out", run, max_file_bytes=8_000),
            run / "last.safetensors", "File too large")
    assert not any(tmp_path.iterdir())


def test_disk_full_during_segment_predict_leaves_no_output_folder(seg_data, seg_checkpoint, tmp_path, warm_caches):
    out = tmp_path / "labels"
    err = refused(cnnkit("segment", "predict", seg_checkpoint, "--images", seg_data / "images", "--out", out,
                         "--no-tta", max_file_bytes=500), out, "File too large")
    assert "free some space" in err
    assert not any(tmp_path.iterdir())


def test_disk_full_during_eval_out_leaves_no_output_folder(checkpoint, tmp_path, warm_caches):
    out = tmp_path / "eval"
    refused(cnnkit("eval", checkpoint, "--out", out, max_file_bytes=1_000), out / "confusion.png", "File too large")
    assert not any(tmp_path.iterdir())


def test_disk_full_during_augment_show_leaves_no_file(seg_data, tmp_path, warm_caches):
    show = tmp_path / "grid.png"
    refused(cnnkit("augment", seg_data / "images" / "generated_000.png", "--show", show, "--load-size", "32",
                   "--crop-size", "24", max_file_bytes=1_000), show, "File too large")
    assert not any(tmp_path.iterdir())


def test_a_folder_where_a_file_is_expected_and_the_reverse(seg_data, checkpoint, tmp_path):
    folder, file = tmp_path / "folder", tmp_path / "file"
    folder.mkdir()
    file.write_text("mine\n")
    refused(cnnkit("augment", seg_data / "images" / "generated_000.png", "--show", folder, "--load-size", "32",
                   "--crop-size", "24"), f"cannot write {folder}: it is a folder")
    refused(cnnkit("eval", checkpoint, "--out", file), f"output folder {file}", "is a file, not a folder")
    assert files_under(tmp_path) == {Path("folder"), Path("file")} and file.read_text() == "mine\n"


def test_writes_that_fail_name_the_file_and_leave_nothing(tmp_path):
    from cnnkit.errors import OutputError
    from cnnkit.utils import write_text_atomic

    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("mine\n")
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'folder'}: it is a folder"):
        write_text_atomic(tmp_path / "folder", "x")
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'file' / 'x'}: {tmp_path / 'file'} is not a"):
        write_text_atomic(tmp_path / "file" / "x", "x")
    assert files_under(tmp_path) == {Path("folder"), Path("file")}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(seg_data, seg_checkpoint, idx_data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused(cnnkit("train", "--data", idx_data, "--epochs", "1", "--out", locked / "run"), locked / "run",
                "Permission denied")
        refused(cnnkit("segment", "predict", seg_checkpoint, "--images", seg_data / "images", "--out",
                       locked / "labels", "--no-tta"), locked / "labels", "Permission denied")
        refused(cnnkit("augment", seg_data / "images" / "generated_000.png", "--show", locked / "grid.png",
                       "--load-size", "32", "--crop-size", "24"), locked / "grid.png", "Permission denied")
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o755)


# With write access to /dev (root), the writer this fixes would have replaced /dev/full by a regular file.
@pytest.mark.skipif(not Path("/dev/full").exists() or os.access("/dev", os.W_OK),
                    reason="needs /dev/full and a /dev the tests cannot write to")
def test_dev_full_as_the_output_file(seg_data, seg_checkpoint):
    refused(cnnkit("segment", "eval", seg_checkpoint, "--data", seg_data, "--no-tta", "--out", "/dev/full"),
            "cannot write /dev/full: No space left on device")
    refused(cnnkit("augment", seg_data / "images" / "generated_000.png", "--show", "/dev/full", "--load-size",
                   "32", "--crop-size", "24"), "cannot write /dev/full: No space left on device")


@pytest.mark.parametrize("argv", [
    ["visualize", "{missing}", "--out", "{out}"],
    ["retrieve", "{missing}", "--out", "{out}"],
    ["transfer", "--data", "{missing}", "--out", "{out}"],
    ["ablate", "--grid", "kernel_size=3", "--data", "{missing}", "--out", "{out}"],
], ids=["visualize", "retrieve", "transfer", "ablate"])
def test_failed_studies_leave_no_new_folder(tmp_path, argv):
    missing, out = tmp_path / "missing.safetensors", tmp_path / "studies" / "out"
    refused(cnnkit(*[a.format(missing=missing, out=out) for a in argv]), missing)
    assert not any(tmp_path.iterdir())  # neither the folder nor the parent made for it
