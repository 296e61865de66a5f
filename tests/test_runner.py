"""The run folder under stress: a second process on the same folder, and a kill between the epoch's files."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnkit.train import runner
from cnnkit.train.checkpoint import load_checkpoint
from cnnkit.train.runner import RunLock, TrainConfig, fit

SRC = str(Path(__file__).resolve().parents[1] / "src")


def quick(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"out": str(out), "epochs": 2, "batch_size": 64, "lr": 0.05, **kw})


def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "cnnkit", "train", "--epochs", "1", "--out", str(out)]
    with RunLock(out):  # this process holds the folder
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 2
        assert done.stderr == (f"error: run folder {out} is in use by process {os.getpid()} on "
                               f"{os.uname().nodename}; wait for it to finish or choose another --out\n")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    # the holder is gone (as after a kill): its lock file is taken over
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert (out / "last.safetensors").is_file()


def test_a_kill_between_last_and_best_is_repaired_on_resume(tmp_path, monkeypatch):
    straight = fit(quick(tmp_path / "a"), progress=False)
    history = load_checkpoint(straight["last_checkpoint"]).meta["history"]
    assert history[1]["val_acc1"] > history[0]["val_acc1"]  # epoch 2 is the best: the window matters
    real_copy = runner._copy_atomic
    calls = []

    def killed(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # epoch 2's copy to best.safetensors: the process dies here
            (dst.parent / f".{dst.name}.x1y2z3.tmp").write_bytes(b"half a file")
            raise KeyboardInterrupt
        real_copy(src, dst)

    monkeypatch.setattr(runner, "_copy_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(quick(tmp_path / "b"), progress=False)
    monkeypatch.setattr(runner, "_copy_atomic", real_copy)
    out = tmp_path / "b"
    assert load_checkpoint(out / "best.safetensors").epoch == 1 and load_checkpoint(out / "last.safetensors").epoch == 2
    fit(quick(tmp_path / "b"), resume=True, progress=False)
    a = load_checkpoint(tmp_path / "a" / "best.safetensors")
    b = load_checkpoint(out / "best.safetensors")
    assert b.epoch == 2 and all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert [int(r["epoch"]) for r in csv.DictReader(open(out / "metrics.csv"))] == [1, 2]
    assert not list(out.glob(".*.tmp"))
