"""Layer benchmarks, each against its baseline, side by side in one run (medians of repetitions).

1. LocallyConnected2d (unfold + one batched matmul) against a naive Python loop over output
   locations (one matmul per location), forward + backward.
2. FFTConv2d against F.conv2d over odd kernel sizes 3..31 on 128x128 maps ("same" padding),
   forward (and forward + backward for k = 3, 7, ..., 31), with the crossover kernel size.
3. Dilated average pooling (cnnkit.layers.avg_pool) against the usual emulation, a depthwise
   convolution with a constant dilated kernel, forward and forward + backward.

    python benchmarks/layers.py            # full run
    python benchmarks/layers.py --quick    # fewer sizes and repetitions
    python benchmarks/layers.py --threads 1 --only fft

Timings on a shared machine are noisy: read the ratios, which are measured back to back. On a
loaded machine ``--threads 1`` gives far steadier ratios (idle threads spin-wait for busy cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cnnkit.layers import LocallyConnected2d, avg_pool, fft_conv


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up (allocations, primitive caches)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def forward_backward(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], object]:
    """A closure that runs fn forward and backward (gradients for every input that requires them)."""
    def run():
        y = fn(*inputs)
        torch.autograd.grad(y, [t for t in inputs if t.requires_grad], torch.ones_like(y))
    return run


def bench_locally_connected(reps: int, quick: bool) -> None:
    B, C, O, H, k = (4, 8, 8, 12, 3) if quick else (8, 16, 16, 16, 3)
    print(f"\n## LocallyConnected2d: batch {B}, {C}->{O} channels, {H}x{H} input, {k}x{k} kernel, "
          f"padding 1 ({H * H} locations), forward + backward, float32")
    layer = LocallyConnected2d(C, O, (H, H), k, padding=1)
    x = torch.randn(B, C, H, H, requires_grad=True)
    weight, bias = layer.weight, layer.bias  # (L, O, C*k*k), (O, H, W)

    def naive(x, weight, bias):
        xp = F.pad(x, (1, 1, 1, 1))
        rows = []
        for i in range(H):
            for j in range(H):
                patch = xp[:, :, i:i + k, j:j + k].reshape(B, -1)  # (B, C*k*k), the unfold column order
                rows.append(patch @ weight[i * H + j].T + bias[:, i, j])  # (B, O)
        return torch.stack(rows, dim=-1).view(B, O, H, H)

    def fast(x, weight, bias):
        return layer(x)

    diff = (naive(x, weight, bias) - fast(x, weight, bias)).abs().max().item()
    t_fast = median_ms(forward_backward(fast, x, weight, bias), reps)
    t_naive = median_ms(forward_backward(naive, x, weight, bias), reps)
    print(f"{'implementation':<40}{'ms':>10}")
    print(f"{'unfold + batched matmul (cnnkit)':<40}{t_fast:>10.2f}")
    print(f"{'loop over locations, matmul each':<40}{t_naive:>10.2f}")
    print(f"speed-up {t_naive / t_fast:.1f}x   max |difference| {diff:.1e}")


def bench_fft_conv(reps: int, quick: bool) -> None:
    B, C, O, H = 4, 16, 16, 128
    kernels = list(range(3, 32, 4)) if quick else list(range(3, 32, 2))
    print(f"\n## FFTConv2d vs F.conv2d: batch {B}, {C}->{O} channels, {H}x{H} maps, padding k//2 "
          f"(same size out), float32")
    x = torch.randn(B, C, H, H)
    xg = x.clone().requires_grad_(True)
    header = f"{'kernel':>6}{'conv ms':>11}{'fft ms':>10}{'conv/fft':>10}"
    if not quick:
        header += f"{'conv f+b':>11}{'fft f+b':>10}{'conv/fft':>10}"
    print(header)
    faster, faster_fb = [], []
    for k in kernels:
        w = torch.randn(O, C, k, k) / k
        wg = w.clone().requires_grad_(True)
        t_conv = median_ms(lambda: F.conv2d(x, w, padding=k // 2), reps)  # noqa: B023
        t_fft = median_ms(lambda: fft_conv(x, w, padding=k // 2), reps)  # noqa: B023
        line = f"{k:>6}{t_conv:>11.1f}{t_fft:>10.1f}{t_conv / t_fft:>10.2f}"
        if not quick and k % 4 == 3:  # forward + backward on every other size: a direct one is slow
            tb_conv = median_ms(forward_backward(lambda a, b: F.conv2d(a, b, padding=k // 2), xg, wg), reps)  # noqa: B023
            tb_fft = median_ms(forward_backward(lambda a, b: fft_conv(a, b, padding=k // 2), xg, wg), reps)  # noqa: B023
            line += f"{tb_conv:>11.1f}{tb_fft:>10.1f}{tb_conv / tb_fft:>10.2f}"
            faster_fb.append((k, tb_fft < tb_conv))
        print(line)
        faster.append((k, t_fft < t_conv))
    for what, results in (("forward", faster), ("forward + backward", faster_fb)):
        if results:
            ks, wins = zip(*results)
            crossover = next((k for i, k in enumerate(ks) if all(wins[i:])), None)
            verdict = (f"FFT faster from kernel {crossover} on" if crossover
                       else "FFT not faster at the largest kernel")
            print(f"crossover ({what}): {verdict}")


def bench_dilated_avg_pool(reps: int, quick: bool) -> None:
    B, C, H = 4, 16, 128
    configs = [(3, 2, 1), (5, 2, 1), (3, 2, 2)] if quick else [(3, 2, 1), (3, 4, 1), (5, 2, 1), (7, 3, 1),
                                                              (3, 2, 2), (2, 8, 1)]
    print(f"\n## Dilated average pooling vs depthwise-conv emulation: batch {B}, {C} channels, {H}x{H}, "
          f"no padding, float32")
    print(f"{'k':>3}{'d':>3}{'s':>3}{'emul fwd':>10}{'ours fwd':>10}{'ratio':>7}"
          f"{'emul f+b':>10}{'ours f+b':>10}{'ratio':>7}{'max|diff|':>11}")
    x = torch.randn(B, C, H, H, requires_grad=True)
    for k, d, s in configs:
        ones = torch.full((C, 1, k, k), 1.0 / (k * k))

        def emulation(t, k=k, d=d, s=s, ones=ones):
            return F.conv2d(t, ones, stride=s, dilation=d, groups=C)

        def ours(t, k=k, d=d, s=s):
            return avg_pool(t, k, s, 0, d)

        diff = (emulation(x) - ours(x)).abs().max().item()
        with torch.no_grad():
            t_emul = median_ms(lambda: emulation(x), reps)  # noqa: B023
            t_ours = median_ms(lambda: ours(x), reps)  # noqa: B023
        tb_emul = median_ms(forward_backward(emulation, x), reps)
        tb_ours = median_ms(forward_backward(ours, x), reps)
        print(f"{k:>3}{d:>3}{s:>3}{t_emul:>10.2f}{t_ours:>10.2f}{t_emul / t_ours:>7.2f}"
              f"{tb_emul:>10.2f}{tb_ours:>10.2f}{tb_emul / tb_ours:>7.2f}{diff:>11.1e}")
    print("ratio > 1: cnnkit faster. The emulation is exact only without padding (or with "
          "count_include_pad=True and no ceil-mode overhang); cnnkit divides by the true tap counts.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per timing (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", choices=["lc", "fft", "pool"], default=None, help="run one section")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 5)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, median of {reps} runs")
    sections = {"lc": bench_locally_connected, "fft": bench_fft_conv, "pool": bench_dilated_avg_pool}
    for name, bench in sections.items():
        if args.only in (None, name):
            bench(reps, args.quick)


if __name__ == "__main__":
    main()
