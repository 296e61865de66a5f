"""Training-step throughput: cnnkit's engine against a minimal plain PyTorch loop, and bfloat16's speedup.

    python benchmarks/train_step.py [--batch 32] [--steps 4] [--reps 5] [--size 112]

Model: a CNN-M-like network (Chatfield et al. 2014: conv 96x7x7/2, pool, conv 256x5x5/2, pool,
3 x conv 512x3x3, pool, FC 4096, FC 4096, FC 1000 with dropout) at 112 x 112 input, defined here so the
benchmark does not depend on the zoo. The LRN layers are left out: they are memory-bound elementwise
work (about a third of this net's step time on the 2-core development machine) that no precision
speeds up, and the point here is the step's overhead and the matrix units. Data: random images in
memory (loading is not measured); the mean image is subtracted in both loops.

Every variant trains its own copy of the same initial model on the same batches. The variants run
interleaved (the order rotates every repetition) and each figure is the median over repetitions of
images per second over ``--steps`` steps, so the ratios are measured side by side in one run, as this
shared machine's absolute speed drifts. The plain loop does what any training loop must (subtract the
mean, forward, cross-entropy, zero_grad, backward, step); cnnkit's step adds the NaN check, top-1/top-5
and confusion-matrix bookkeeping.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.train.engine import train_one_epoch


def cnn_m_like(num_classes: int = 1000) -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(3, 96, 7, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 512, 3, padding=1), nn.ReLU(), nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(),
        nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
    )
    return nn.Sequential(features, nn.Flatten(), nn.LazyLinear(4096), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, num_classes))


def plain_epoch(model, optimizer, batches, mean) -> None:
    model.train()
    for x, y in batches:
        loss = F.cross_entropy(model(x - mean), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def cnnkit_epoch(model, optimizer, batches, mean, **options) -> None:
    train_one_epoch(model, batches, optimizer, device=torch.device("cpu"), num_classes=1000, mean=mean,
                    progress=False, **options)


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags.split()]
    return ", ".join(found) or "none of avx512_bf16 / amx_bf16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed repetition")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(args.batch, 3, args.size, args.size, generator=g),
                torch.randint(0, 1000, (args.batch,), generator=g)) for _ in range(args.steps)]
    mean = torch.full((3, args.size, args.size), 0.5)
    base = cnn_m_like()
    base(torch.zeros(1, 3, args.size, args.size))  # materialise the lazy layer

    def variant(channels_last=False):
        model = copy.deepcopy(base)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    runs = {
        "plain PyTorch, fp32": (variant(), lambda m, o: plain_epoch(m, o, batches, mean)),
        "cnnkit, fp32": (variant(), lambda m, o: cnnkit_epoch(m, o, batches, mean)),
        "cnnkit, bf16": (variant(), lambda m, o: cnnkit_epoch(m, o, batches, mean, precision="bf16")),
        "cnnkit, bf16 + channels_last": (variant(True), lambda m, o: cnnkit_epoch(
            m, o, batches, mean, precision="bf16", channels_last=True)),
    }
    for (model, optimizer), run in runs.values():  # warm-up: allocator, oneDNN primitive caches
        run(model, optimizer)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            (model, optimizer), run = runs[name]
            t0 = time.perf_counter()
            run(model, optimizer)
            rates[name].append(args.batch * args.steps / (time.perf_counter() - t0))
    median = {name: statistics.median(r) for name, r in rates.items()}

    print(f"CNN-M-like net at {args.size}x{args.size}, batch {args.batch}, {args.steps} steps x {args.reps} "
          f"repetitions, {torch.get_num_threads()} threads, torch {torch.__version__}; CPU bf16 flags: {cpu_flags()}")
    print(f"{'variant':32s} {'images/s (median)':>18s}  {'min..max':>14s}")
    for name, r in rates.items():
        print(f"{name:32s} {median[name]:18.1f}  {min(r):6.1f}..{max(r):<6.1f}")
    plain, fp32 = median["plain PyTorch, fp32"], median["cnnkit, fp32"]
    print(f"cnnkit / plain PyTorch, fp32:            {fp32 / plain:.3f}  (target >= 1.0)")
    print(f"bf16 speedup over fp32 (cnnkit):         {median['cnnkit, bf16'] / fp32:.2f}x")
    print(f"bf16 + channels_last speedup over fp32:  {median['cnnkit, bf16 + channels_last'] / fp32:.2f}x  "
          f"(target >= 2x on CPUs with bf16 matrix units)")


if __name__ == "__main__":
    main()
