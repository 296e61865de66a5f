"""Multi-process training with DistributedDataParallel, launched by ``torchrun``.

``torchrun --nproc_per_node=N -m cnnkit train ...`` starts N copies of the command with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; :func:`init` joins them into a process group
(NCCL when each process gets a GPU, gloo on CPU). The design goal is that N processes compute what
one process computes with the same global batch and seed:

- :class:`GlobalBatchSampler` forms the global batches exactly as one process would (one permutation
  of the training set per epoch, from the seed and the epoch), and each rank takes a contiguous slice
  of every global batch;
- each rank weights its mean loss by ``n_rank * world / n_global``, so DDP's gradient average equals
  the gradient of the mean loss over the whole global batch, also when slices differ in size;
- random augmentation parameters are drawn for the whole global batch on every rank, from the same
  generator, and each rank applies its slice;
- metrics are sums reduced over ranks; only rank 0 writes files.

Dropout masks are drawn per rank (seeded from seed, epoch and rank), so they differ from one process's;
BatchNorm statistics are per rank unless the model is converted to SyncBatchNorm (done on CUDA).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from cnnkit.errors import ConfigError
from cnnkit.utils import resolve_device

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process stands in the run: rank, world size, its device, and whether it owns the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self, failed: bool = False) -> None:
        """Leave the group; after a failure without the barrier (the others may be in another collective,
        and torchrun stops them when this process exits with an error)."""
        if self.owns_group and dist.is_initialized():
            if not failed:
                dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def init(device: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"--device {device} with torchrun: use auto, cuda (one GPU per process, "
                          "cuda:LOCAL_RANK) or cpu")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = resolve_device("cpu")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    log.debug("rank %d/%d on %s (%s)", rank, world, dev, dist.get_backend())
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)


def rank_slice(n_global: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous slice [lo, hi) of a global batch of ``n_global`` items (sizes differ by <= 1)."""
    return n_global * rank // world, n_global * (rank + 1) // world


class GlobalBatchSampler(Sampler[list[int]]):
    """Index lists of this rank's slice of each global batch.

    With one process it yields ``DataLoader(shuffle=True, batch_size=B)``-style batches of a permutation
    drawn from ``torch.Generator().manual_seed(seed)``. A final global batch smaller than the number of
    processes is dropped when ``world_size > 1`` (some rank would get no item).
    ``layout`` lists (lo, hi, n_global) for each batch this rank yields, in order.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0):
        if batch_size < world_size:
            raise ConfigError(f"--batch-size {batch_size} is smaller than the {world_size} processes; "
                              f"the global batch must give each process at least one image")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        self.batches: list[list[int]] = []
        self.layout: list[tuple[int, int, int]] = []
        for start in range(0, n, batch_size):
            n_global = min(batch_size, n - start)
            if world_size > 1 and n_global < world_size:
                log.debug("dropping a last global batch of %d items (< %d processes)", n_global, world_size)
                continue
            lo, hi = rank_slice(n_global, rank, world_size)
            self.batches.append(order[start + lo : start + hi].tolist())
            self.layout.append((lo, hi, n_global))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def wrap(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """The model DDP-wrapped for a distributed run (SyncBatchNorm on CUDA); unchanged in one process."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if ctx.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[ctx.device.index])
    return DistributedDataParallel(model)
