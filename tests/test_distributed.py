"""Distributed training: the global-batch sampler, the loss weighting that makes DDP's average exact, and
2 processes under torchrun reaching the weights of 1 process (and resuming on another number of them)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.train.checkpoint import load_checkpoint
from cnnkit.train.distributed import GlobalBatchSampler, rank_slice
from cnnkit.train.runner import TrainConfig, fit


def test_rank_slices_of_each_global_batch_are_the_one_process_batches():
    n, batch, world = 103, 10, 3
    single = list(GlobalBatchSampler(n, batch, seed=5))
    assert [i for b in single for i in b] == torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()
    ranks = [GlobalBatchSampler(n, batch, rank=r, world_size=world, seed=5) for r in range(world)]
    for step, whole in enumerate(single):
        assert sum((list(ranks[r])[step] for r in range(world)), []) == whole
        for r in range(world):
            lo, hi, n_global = ranks[r].layout[step]
            assert (lo, hi) == rank_slice(len(whole), r, world) and n_global == len(whole)
    # the last global batch of 3 items still gives each of 3 ranks one; of 2 it would not: dropped
    assert len(GlobalBatchSampler(102, 10, rank=2, world_size=3)) == 10
    with pytest.raises(ConfigError, match="--batch-size"):
        GlobalBatchSampler(10, 2, world_size=4)


def test_weighted_rank_losses_average_to_the_global_gradient():
    # the slow twin of DDP: each "rank" backpropagates its weighted mean loss; DDP averages the gradients
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(11, 6, dtype=torch.float64), torch.randint(0, 3, (11,))
    full = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    world, grads = 3, []
    for r in range(world):
        lo, hi = rank_slice(len(y), r, world)  # slices of 3, 4 and 4 items
        loss = F.cross_entropy(net(x[lo:hi]), y[lo:hi]) * ((hi - lo) * world / len(y))
        grads.append(torch.autograd.grad(loss, list(net.parameters())))
    for k, g in enumerate(full):
        torch.testing.assert_close(sum(rank[k] for rank in grads) / world, g, atol=1e-14, rtol=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMON = ["--epochs", "1", "--batch-size", "63", "--augment", "flip,rotate=5", "--device", "cpu", "--lr", "0.05"]


def config(out: Path, epochs: int = 1) -> TrainConfig:
    return TrainConfig(out=str(out), epochs=epochs, batch_size=63, augment="flip,rotate=5", device="cpu", lr=0.05)


def max_difference(a: Path, b: Path) -> float:
    sa, sb = load_checkpoint(a).model_state, load_checkpoint(b).model_state
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)



@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one_and_resume_on_one(tmp_path):
    # 63 images per global batch: ranks take 31 and 32, so the loss weighting matters
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "cnnkit", "train", *COMMON, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("held-out top-1 accuracy") == 1  # only rank 0 prints
    one = fit(config(tmp_path / "one"))
    assert max_difference(tmp_path / "two" / "last.safetensors", Path(one["last_checkpoint"])) < 1e-5
    assert load_checkpoint(tmp_path / "two" / "last.safetensors").meta["val"]["acc1"] == pytest.approx(
        one["final"]["val_acc1"], abs=1 / 359 + 1e-9)  # reduced over both ranks' halves of the held-out set
    # resume the 2-process run in 1 process: the same as 2 epochs in 1 process
    resumed = fit(config(tmp_path / "two", epochs=2), resume=True)
    straight = fit(config(tmp_path / "straight", epochs=2))
    assert max_difference(Path(resumed["last_checkpoint"]), Path(straight["last_checkpoint"])) < 1e-5
