"""Zoo throughput: cnnkit models against plain PyTorch definitions of the same networks.

For each model, images/s of forward (eval, no grad) and forward+backward (train mode), for cnnkit's
model and for the same network written here as a plain ``nn.Sequential`` (no cnnkit), with the
same weights (outputs are checked equal first). Both are timed back to back in each repetition
and the ratio is the median of the per-repetition ratios cnnkit / plain (target >= 1.0).
Variants: float32, float32 channels_last, bfloat16 (weights and inputs). The forward GFLOP/s is
put next to the machine's matmul rate measured in the same run.

    python benchmarks/zoo.py --quick
    python benchmarks/zoo.py --models alexnet,vgg_d --batch 4 --reps 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
from torch import nn

from cnnkit.analysis import summary
from cnnkit.models import create, list_models

# ---- the same networks, written the plain way ----------------------------------------------------


def relu():
    return nn.ReLU(inplace=True)


def lrn(alpha=5e-4, k=2.0):  # torch's LRN divides alpha by size: 5e-4 is the AlexNet paper's 1e-4
    return nn.LocalResponseNorm(5, alpha=alpha, beta=0.75, k=k)


def head(n_in, w6, w7, nc, drop=0.5):
    return [nn.Flatten(), nn.Linear(n_in, w6), relu(), nn.Dropout(drop), nn.Linear(w6, w7), relu(),
            nn.Dropout(drop), nn.Linear(w7, nc)]


def plain_lenet5(nc):
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), nn.Tanh(),
                         nn.AvgPool2d(2), nn.Conv2d(16, 120, 5), nn.Tanh(), nn.Flatten(), nn.Linear(120, 84),
                         nn.Tanh(), nn.Linear(84, nc))


def plain_alexnet(nc):
    return nn.Sequential(
        nn.Conv2d(3, 96, 11, 4), relu(), lrn(), nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2, groups=2), relu(), lrn(), nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, padding=1), relu(),
        nn.Conv2d(384, 384, 3, padding=1, groups=2), relu(),
        nn.Conv2d(384, 256, 3, padding=1, groups=2), relu(), nn.MaxPool2d(3, 2),
        *head(256 * 6 * 6, 4096, 4096, nc))


def plain_zfnet(nc):
    return nn.Sequential(
        nn.Conv2d(3, 96, 7, 2, 1), relu(), lrn(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(96, 256, 5, 2), relu(), lrn(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(256, 384, 3, padding=1), relu(), nn.Conv2d(384, 384, 3, padding=1), relu(),
        nn.Conv2d(384, 256, 3, padding=1), relu(), nn.MaxPool2d(3, 2, ceil_mode=True),
        *head(256 * 6 * 6, 4096, 4096, nc))


def plain_overfeat_fast(nc):
    return nn.Sequential(
        nn.Conv2d(3, 96, 11, 4), relu(), nn.MaxPool2d(2), nn.Conv2d(96, 256, 5), relu(), nn.MaxPool2d(2),
        nn.Conv2d(256, 512, 3, padding=1), relu(), nn.Conv2d(512, 1024, 3, padding=1), relu(),
        nn.Conv2d(1024, 1024, 3, padding=1), relu(), nn.MaxPool2d(2), *head(1024 * 6 * 6, 3072, 4096, nc))


def plain_overfeat_accurate(nc):
    return nn.Sequential(
        nn.Conv2d(3, 96, 7, 2), relu(), nn.MaxPool2d(3), nn.Conv2d(96, 256, 7), relu(), nn.MaxPool2d(2),
        nn.Conv2d(256, 512, 3, padding=1), relu(), nn.Conv2d(512, 512, 3, padding=1), relu(),
        nn.Conv2d(512, 1024, 3, padding=1), relu(), nn.Conv2d(1024, 1024, 3, padding=1), relu(),
        nn.MaxPool2d(3), *head(1024 * 5 * 5, 4096, 4096, nc))


def plain_cnn_f(nc):
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4), relu(), lrn(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(64, 256, 5, padding=2), relu(), lrn(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(256, 256, 3, padding=1), relu(), nn.Conv2d(256, 256, 3, padding=1), relu(),
        nn.Conv2d(256, 256, 3, padding=1), relu(), nn.MaxPool2d(3, 2, ceil_mode=True),
        *head(256 * 6 * 6, 4096, 4096, nc))


def plain_cnn_m(nc, w7=4096):
    return nn.Sequential(
        nn.Conv2d(3, 96, 7, 2), relu(), lrn(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(96, 256, 5, 2, 1), relu(), lrn(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(256, 512, 3, padding=1), relu(), nn.Conv2d(512, 512, 3, padding=1), relu(),
        nn.Conv2d(512, 512, 3, padding=1), relu(), nn.MaxPool2d(3, 2, ceil_mode=True),
        *head(512 * 6 * 6, 4096, w7, nc))


def plain_cnn_s(nc):
    return nn.Sequential(
        nn.Conv2d(3, 96, 7, 2), relu(), lrn(), nn.MaxPool2d(3, 3, ceil_mode=True),
        nn.Conv2d(96, 256, 5, 1, 1), relu(), nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.Conv2d(256, 512, 3, padding=1), relu(), nn.Conv2d(512, 512, 3, padding=1), relu(),
        nn.Conv2d(512, 512, 3, padding=1), relu(), nn.MaxPool2d(3, 3, ceil_mode=True),
        *head(512 * 6 * 6, 4096, 4096, nc))


VGG = {"a": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
       "b": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
       "d": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
       "e": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512,
             "M"]}
VGG["a_lrn"] = [64, "LRN", *VGG["a"][1:]]
VGG["c"] = [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M", 512, 512, (512, 1), "M",
            512, 512, (512, 1), "M"]


def plain_vgg(cfg, nc, width=4096):
    layers, c = [], 3
    for v in VGG[cfg]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        elif v == "LRN":
            layers.append(lrn())
        else:
            out, k = v if isinstance(v, tuple) else (v, 3)
            layers += [nn.Conv2d(c, out, k, padding=k // 2), relu()]
            c = out
    return nn.Sequential(*layers, *head(512 * 7 * 7, width, width, nc))


def plain_nin(nc):
    def mlpconv(c_in, c, k, s, p, c2=None):
        return [nn.Conv2d(c_in, c, k, s, p), relu(), nn.Conv2d(c, c, 1), relu(),
                nn.Conv2d(c, c2 or c, 1), relu()]
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
    return nn.Sequential(*mlpconv(3, 96, 11, 4, 0), pool(), *mlpconv(96, 256, 5, 1, 2), pool(),
                         *mlpconv(256, 384, 3, 1, 1), pool(), nn.Dropout(), *mlpconv(384, 1024, 3, 1, 1, nc),
                         nn.AvgPool2d(6, 1), nn.Flatten())


class PlainInception(nn.Module):
    def __init__(self, c, n1, r3, n3, r5, n5, pp):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(c, n1, 1), relu())
        self.b2 = nn.Sequential(nn.Conv2d(c, r3, 1), relu(), nn.Conv2d(r3, n3, 3, padding=1), relu())
        self.b3 = nn.Sequential(nn.Conv2d(c, r5, 1), relu(), nn.Conv2d(r5, n5, 5, padding=2), relu())
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), nn.Conv2d(c, pp, 1), relu())

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


def plain_googlenet(nc):
    cfg = [(192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64), "M",
           (480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64),
           (512, 128, 128, 256, 24, 64, 64), (512, 112, 144, 288, 32, 64, 64),
           (528, 256, 160, 320, 32, 128, 128), "M",
           (832, 256, 160, 320, 32, 128, 128), (832, 384, 192, 384, 48, 128, 128)]
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
    body = [pool() if v == "M" else PlainInception(*v) for v in cfg]
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3), relu(), pool(), lrn(1e-4, 1.0), nn.Conv2d(64, 64, 1), relu(),
        nn.Conv2d(64, 192, 3, padding=1), relu(), lrn(1e-4, 1.0), pool(), *body,
        nn.AvgPool2d(7, 1), nn.Dropout(0.4), nn.Flatten(), nn.Linear(1024, nc))


def plain_deep_image(nc):
    layers, c = [], 3
    for v in VGG["d"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), relu()]
            c = v
    return nn.Sequential(*layers, *head(512 * 7 * 7, 6144, 6144, nc))


PLAIN = {"lenet5": plain_lenet5, "alexnet": plain_alexnet, "zfnet": plain_zfnet,
         "overfeat_fast": plain_overfeat_fast, "overfeat_accurate": plain_overfeat_accurate,
         "cnn_f": plain_cnn_f, "cnn_m": plain_cnn_m, "cnn_s": plain_cnn_s, "nin": plain_nin,
         "googlenet": plain_googlenet, "deep_image": plain_deep_image,
         **{f"cnn_m_{w}": (lambda nc, w=w: plain_cnn_m(nc, w)) for w in (2048, 1024, 128)},
         **{f"vgg_{c}": (lambda nc, c=c: plain_vgg(c, nc)) for c in VGG}}
QUICK = ["lenet5", "alexnet", "cnn_f", "nin", "googlenet"]

# ---- measuring -----------------------------------------------------------------------------------


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    ps, pd = list(src.parameters()), list(dst.parameters())
    assert len(ps) == len(pd), f"{len(ps)} vs {len(pd)} parameter tensors"
    with torch.no_grad():
        for a, b in zip(ps, pd):
            assert a.shape == b.shape, f"{a.shape} vs {b.shape}"
            b.copy_(a)


def timed(fn, device: torch.device | None = None) -> float:
    t = time.perf_counter()
    fn()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def measure(models: dict[str, nn.Module], x: torch.Tensor, reps: int, train: bool,
            min_time: float = 0.05) -> tuple[dict[str, float], float]:
    """Images/s of each model (median over ``reps``) and the median of the per-repetition ratios
    ours / plain. The two are timed back to back in every repetition (order flipped each time), so
    that load from other processes hits both alike; a repetition runs enough steps to last
    ``min_time`` seconds."""

    def step(m):
        if train:
            m.zero_grad(set_to_none=True)
            m(x).float().sum().backward()
        else:
            with torch.no_grad():
                m(x)

    for m in models.values():
        m.train(train)
    warm = max(timed(lambda m=m: step(m), x.device) for m in models.values())
    n = max(1, math.ceil(min_time / max(warm, 1e-6)))

    def run(m):
        for _ in range(n):
            step(m)

    times = {k: [] for k in models}
    keys = list(models)
    for r in range(reps):
        for k in keys if r % 2 == 0 else keys[::-1]:
            times[k].append(timed(lambda m=models[k]: run(m), x.device) / n)
    rate = {k: x.shape[0] / statistics.median(v) for k, v in times.items()}
    return rate, statistics.median(p / o for p, o in zip(times["plain"], times["ours"]))


def matmul_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    return 2 * n**3 / statistics.median(timed(lambda: a @ b) for _ in range(reps)) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated names or patterns (default: all; --quick: a few)")
    p.add_argument("--quick", action="store_true", help="small models, batch 2, 3 repetitions")
    p.add_argument("--batch", type=int, help="images per step (default 4; 2 with --quick)")
    p.add_argument("--reps", type=int, help="timed repetitions per measurement (default 5; 3 with --quick)")
    p.add_argument("--variants", default="fp32,channels_last,bf16", help="subset of fp32,channels_last,bf16")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    batch = args.batch or (2 if args.quick else 4)
    reps = args.reps or (3 if args.quick else 5)
    if args.models:
        names = [n for pat in args.models.split(",") for n in list_models(pat.strip())]
    else:
        names = QUICK if args.quick else list_models()
    unknown = [n for n in names if n not in PLAIN]
    if not names or unknown:
        sys.stderr.write(f"error: no plain definition for {unknown or args.models}\n")
        return 2
    variants = args.variants.split(",")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__} on {device} ({torch.get_num_threads()} CPU threads), batch {batch}, "
          f"median of {reps}; matmul 1024^3 on CPU: fp32 {matmul_gflops(torch.float32):.0f} GFLOP/s, "
          f"bf16 {matmul_gflops(torch.bfloat16):.0f} GFLOP/s")
    head = (f"{'model':18} {'variant':13} | {'forward img/s: cnnkit':>21} {'plain':>8} {'ratio':>6} "
            f"{'GFLOP/s':>8} | {'fwd+bwd img/s: cnnkit':>21} {'plain':>8} {'ratio':>6}")
    print(head + "\n" + "-" * len(head))
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    for name in names:
        ours = create(name, num_classes=args.num_classes).to(device)
        plain = PLAIN[name](args.num_classes).to(device)
        copy_weights(ours, plain)
        x = torch.randn(batch, *ours.input_size, device=device)
        with torch.no_grad():  # same network: same scores
            torch.testing.assert_close(plain.eval()(x), ours.eval()(x), rtol=1e-4, atol=1e-4)
        flops = summary(ours, ours.input_size).flops
        for variant in variants:
            dtype = torch.bfloat16 if variant == "bf16" else torch.float32
            fmt = torch.channels_last if variant == "channels_last" else torch.contiguous_format
            models = {k: m.to(dtype=dtype, memory_format=fmt) for k, m in (("ours", ours), ("plain", plain))}
            xv = x.to(dtype=dtype).contiguous(memory_format=fmt)
            try:
                fwd, r_f = measure(models, xv, reps, train=False)
                bwd, r_b = measure(models, xv, reps, train=True)
            except (NotImplementedError, RuntimeError) as exc:  # e.g. CPU LRN in bfloat16
                print(f"{name:18} {variant:13} | n/a: {str(exc).splitlines()[0][:80]}", flush=True)
                continue
            finally:
                for m in (ours, plain):
                    m.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            ratios[variant] += [r_f, r_b]
            print(f"{name:18} {variant:13} | {fwd['ours']:21.1f} {fwd['plain']:8.1f} {r_f:6.2f} "
                  f"{fwd['ours'] * flops / 1e9:8.1f} | {bwd['ours']:21.1f} {bwd['plain']:8.1f} {r_b:6.2f}",
                  flush=True)
        del ours, plain
    for variant, rs in ratios.items():
        if rs:
            gmean = math.exp(sum(math.log(r) for r in rs) / len(rs))
            print(f"{variant}: geometric mean cnnkit/plain ratio {gmean:.3f} over {len(rs)} measurements "
                  f"(min {min(rs):.2f}, max {max(rs):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
