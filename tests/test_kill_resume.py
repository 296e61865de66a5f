"""No crash window loses a checkpoint: a real ``cnnkit train`` process is killed with SIGKILL at many
instants, restarted with ``--resume`` (and killed again), and the run folder it ends with is compared
with an uninterrupted run's.

The instants are the named points of the test hook ``cnnkit.utils.kill_point`` (``CNNKIT_KILL_AT``):
``write NAME`` (a temporary file of atomic_path written, not yet renamed onto NAME), ``rename NAME``
(just renamed), ``step`` (after an optimizer step, i.e. inside an epoch); N counts within one process,
so in a resumed process ``step:1`` is the first step after the checkpoint it resumed from. A few kills
come at seeded random wall-clock times instead, for windows nobody thought of (imports, data loading).

"The same files" means: the same file names (no stale ``.*.tmp``), best/last.safetensors with equal
tensors (torch.equal) and equal metadata, every other file byte for byte (args.json, config.toml, the
PNG pictures, heldout.json), metrics.csv equal row by row. Fields that legitimately differ are the
wall-clock times and nothing else: the ``seconds`` column of metrics.csv and the ``seconds`` of every
row of the checkpoints' ``meta.history`` (from which metrics.csv is rewritten on resume). The runs
are started in different folders with the same relative ``--out`` so that paths in the files agree.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # about 25 training processes: some 90 s of CPU time

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMING = "seconds"  # the one field that differs between two runs of the same command

# 4 epochs of 12 steps; held-out top-1 rises for 3 epochs, then falls: best.safetensors is epoch 3, and
# epoch 4 writes no best (both branches of the epoch's files are killed in)
CLASSIFY = ["train", "--epochs", "4", "--lr", "0.2", "--batch-size", "128", "--threads", "1", "--out", "run"]
# two classes: after the last epoch the held-out threshold is written into best.safetensors (finish)
SEGMENT = ["segment", "train", "--data", "generated", "--generated-count", "4", "--classes", "2", "--epochs", "3",
           "--lr", "0.01", "--option", "width=4", "--option", "patch=16", "--crop", "16", "--dense-mode", "dilated",
           "--threads", "1", "--out", "run"]


def cnnkit(cwd: Path, args: list[str], kill_at: str | None = None, kill_after: float | None = None):
    """The command in a fresh process (in ``cwd``); killed at hook point ``kill_at`` or after ``kill_after``
    seconds. Returns (exit status, stderr); -9 is a SIGKILL."""
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    if kill_at:
        env["CNNKIT_KILL_AT"] = kill_at
    with subprocess.Popen([sys.executable, "-m", "cnnkit", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            _, err = proc.communicate(timeout=kill_after or 240)
        except subprocess.TimeoutExpired:
            if kill_after is None:
                raise
            proc.kill()
            _, err = proc.communicate()
    assert "Traceback" not in err, err[-3000:]
    return proc.returncode, err


def killed_and_resumed(cwd: Path, args: list[str], kills: list[str]) -> Path:
    """Run ``args`` in ``cwd``, killed at each of ``kills`` in turn (every restart with --resume), then
    resume it to the end; returns the run folder."""
    cwd.mkdir()
    for i, kill in enumerate(kills):
        code, err = cnnkit(cwd, args + ["--resume"] * (i > 0), kill_at=kill)
        assert code == -signal.SIGKILL, f"no kill at {kill!r} (exit status {code}): {err[-2000:]}"
    code, err = cnnkit(cwd, args + ["--resume"])
    assert code == 0, f"resume after {kills}: {err[-2000:]}"
    return cwd / "run"


def reference(tmp_path_factory, args: list[str]) -> tuple[Path, float]:
    cwd = tmp_path_factory.mktemp("reference")
    start = time.perf_counter()
    code, err = cnnkit(cwd, args)
    assert code == 0, err
    return cwd / "run", time.perf_counter() - start


@pytest.fixture(scope="module")
def classify_reference(tmp_path_factory):
    return reference(tmp_path_factory, CLASSIFY)


@pytest.fixture(scope="module")
def segment_reference(tmp_path_factory):
    return reference(tmp_path_factory, SEGMENT)


def checkpoint_document(path: Path) -> dict:
    """The JSON metadata of a checkpoint, without the wall-clock times."""
    with safe_open(str(path), framework="pt") as f:
        doc = {k: json.loads(v) if k == "cnnkit" else v for k, v in (f.metadata() or {}).items()}
    for row in doc["cnnkit"]["meta"]["history"]:
        row.pop(TIMING)
    return doc


def metrics(path: Path) -> list[dict]:
    rows = list(csv.DictReader(path.open()))
    for row in rows:
        row.pop(TIMING)
    return rows


def assert_same_run(ref: Path, run: Path, what: str) -> None:
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in run.iterdir()) == names, what  # no stale .tmp, nothing missing
    for name in names:
        a, b = ref / name, run / name
        if name.endswith(".safetensors"):
            ta, tb = load_file(a), load_file(b)
            assert ta.keys() == tb.keys(), f"{what}: {name}"
            different = [k for k in ta if not torch.equal(ta[k], tb[k])]
            assert not different, f"{what}: {name} differs in {different[:5]}"
            assert checkpoint_document(a) == checkpoint_document(b), f"{what}: {name} metadata"
        elif name == "metrics.csv":
            assert metrics(a) == metrics(b), what
        elif name != ".lock":  # the holder's process id
            assert a.read_bytes() == b.read_bytes(), f"{what}: {name}"


# Every window of an epoch's files (checkpoint -> best copy -> metrics.csv -> pictures), of the start
# (args.json, config.toml, resume's repair and metrics rewrite) and of the end (pictures, nothing left
# to train), in the first, a middle, an improving, a non-improving and the last epoch.
CLASSIFY_KILLS = {
    "through every file of the epochs": [
        "rename args.json:1",  # the folder holds no checkpoint yet: --resume starts the run
        "write last.safetensors:1",  # epoch 1's checkpoint written, not renamed
        "rename last.safetensors:1",  # last is epoch 1, best.safetensors absent
        "rename best.safetensors:1",  # resume's repair of best done, metrics.csv not yet written
        "write metrics.csv:2",  # epoch 2's checkpoints done, metrics.csv being replaced
        "write confusion.png:1",  # epoch 3's curves drawn, its confusion matrix being written
        "rename last.safetensors:1",  # the last epoch's checkpoint, none of its pictures
        "write curves.png:1",  # nothing left to train: the final pictures being drawn
    ],
    "best copy, end of the last epoch, a finished run": [
        "step:30",  # inside epoch 3
        "write best.safetensors:1",  # epoch 3 (the best) in last, best.safetensors being replaced
        "rename metrics.csv:2",  # the last epoch's files, before its pictures
        "write config.toml:1",  # a finished run restarted
    ],
}


def test_classification_killed_anywhere_resumes_to_the_same_files(classify_reference, tmp_path):
    ref, _ = classify_reference
    history = [float(r["val_acc1"]) for r in csv.DictReader((ref / "metrics.csv").open())]
    assert history.index(max(history)) == 2  # best epoch 3 of 4: kills in both kinds of epoch
    for i, (what, kills) in enumerate(CLASSIFY_KILLS.items()):
        assert_same_run(ref, killed_and_resumed(tmp_path / f"chain{i}", CLASSIFY, kills), what)


def test_classification_killed_at_random_times(classify_reference, tmp_path):
    """Two kills at seeded random instants of a run's wall time (imports and data loading included)."""
    ref, seconds = classify_reference
    rng = random.Random(11)
    cwd = tmp_path / "random"
    cwd.mkdir()
    when = [round(rng.uniform(0.3, 1.0) * seconds, 2) for _ in range(2)]
    for i, t in enumerate(when):
        code, err = cnnkit(cwd, CLASSIFY + ["--resume"] * (i > 0), kill_after=t)
        assert code in (0, -signal.SIGKILL), err[-2000:]
    code, err = cnnkit(cwd, CLASSIFY + ["--resume"])
    assert code == 0, f"resume after kills at {when} s: {err[-2000:]}"
    assert_same_run(ref, cwd / "run", f"kills at {when} s")


SEGMENT_KILLS = [
    "step:3",  # inside epoch 1, no checkpoint yet
    "rename last.safetensors:2",  # epoch 2 (better) in last, best.safetensors still epoch 1
    "rename last.safetensors:1",  # the last epoch's checkpoint: no best copy, pictures, threshold
    "write best.safetensors:2",  # after the repair, finish's best.safetensors with the threshold
]


def test_segmentation_killed_anywhere_resumes_to_the_same_files(segment_reference, tmp_path):
    ref, _ = segment_reference
    assert_same_run(ref, killed_and_resumed(tmp_path / "chain", SEGMENT, SEGMENT_KILLS), "segmentation")
