"""Dense pixelwise classification vs patch-by-patch (Li, Zhao, Wang arXiv:1412.4526).

For the lecture's toy net, the Simo-Serra descriptor net (64x64 patches, as in Bailer et al.) and a
Ciresan et al.'s membrane net N3 (65x65), on 256x256, 512x512 and 1080x720 images:

- dense time (median of repetitions, after one warm-up call that also picks the layouts);
- patch-by-patch time, measured on a random subset of pixels and scaled to all pixels;
- speedup, and the FLOP ratio of the two methods (the speedup's limit);
- the dense net's achieved GFLOP/s next to fp32 matrix-multiply GFLOP/s measured in the same run;
- peak memory (resident-set high-water mark above the process's state before the dense call,
  one fresh subprocess per configuration; torch.cuda.max_memory_allocated on CUDA), untiled and
  tiled with --max-memory;
- the max abs difference between the dense output and patch-by-patch on the subset;
- on CPU, one line: the descriptor net's ONNX export (cnnkit.dense.export_onnx) in onnxruntime beside
  the PyTorch dense net, same image, same thread count (--onnx-size, default 512x512);
- one line for volumes: a small 3D patch net (22^3 voxels) on a 128^3 volume (--volume-size; 48 with
  --quick), dense vs patch by patch (on a subset of voxels, scaled), with the FLOP ratio.

FLOPs count the convolutions and FC layers (2 x multiply-accumulates). Run from the repository
root: `python benchmarks/dense.py [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

NETS = ("toy", "descriptor", "ciresan_n3")  # or any patch net of cnnkit.models.create_patch_net
SIZES = ("256x256", "512x512", "1080x720")  # W x H


def _run_json(cmd: list[str], what: str) -> dict:
    """Run one measurement in a fresh process (its own peak memory and threads); its last line is JSON."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, ["src", os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, reps: int, device) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def matmul_rate(a: torch.Tensor, b: torch.Tensor, seconds: float, device) -> float:
    """fp32 GFLOP/s of 2048 x 2048 products sustained for about ``seconds`` (at least 3)."""
    n = a.shape[0]
    a @ b
    count, start = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < seconds:
        a @ b
        count += 1
        _sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def one(args) -> dict:
    """Runs in a fresh process: one net, one size, one memory setting."""
    from cnnkit.dense import densify, patch_by_patch
    from cnnkit.dense.allocator import retain_freed_memory
    from cnnkit.models import create_patch_net

    retained = retain_freed_memory() if not args.default_malloc else False

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, patch = create_patch_net(args.net)
    model.to(device).eval()
    w, h = (int(v) for v in args.size.split("x"))
    max_memory = int(args.max_memory) if args.max_memory else None
    dense = densify(model, patch, mode=args.mode, max_memory=max_memory)
    x = torch.randn(1, dense.in_channels, h, w, device=device)
    result = {"net": args.net, "size": args.size, "tiled": bool(max_memory),
              "threads": torch.get_num_threads(), "retained_malloc": retained}
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    with torch.no_grad():
        # dense first, so that the high-water mark above `base` is the dense net's alone
        base = _rss_mb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        y = dense(x)  # warm-up: layouts are timed and chosen here
        dense_times, mm_rates = [], []
        for _ in range(args.reps):  # interleaved, so both see the same load on a shared machine
            dense_times.append(_median_time(lambda: dense(x), 1, device))
            mm_rates.append(matmul_rate(a, b, dense_times[-1], device))
        result["dense_seconds"] = statistics.median(dense_times)
        result["matmul_gflops"] = statistics.median(mm_rates)
        result["peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                             else _rss_mb() - base)
        if not max_memory:
            # patch-by-patch on a random subset of pixels, scaled to all pixels
            gen = torch.Generator().manual_seed(1)
            flat = torch.randperm(h * w, generator=gen)[: args.pixels]
            pos = torch.stack([flat // w, flat % w], 1)
            def baseline():
                return patch_by_patch(model, x, patch, pixels=pos, batch_size=512, channels_last=True)

            patch_by_patch(model, x, patch, pixels=pos[:64], channels_last=True)  # warm-up
            t = _median_time(baseline, args.patch_reps, device)
            result["patch_seconds_subset"] = t
            result["patch_seconds"] = t * h * w / len(pos)
            ref = baseline()
            result["max_abs_diff"] = (y[0][:, pos[:, 0], pos[:, 1]] - ref[0]).abs().max().item()
    flops = 2 * dense.macs((h, w))
    result["dense_gflops"] = flops / result["dense_seconds"] / 1e9
    result["flop_ratio"] = 2 * dense.patch_macs() * h * w / flops
    result["layouts"] = [r["layout"] for r in dense.layers() if "layout" in r]
    if "patch_seconds" in result:
        result["speedup"] = result["patch_seconds"] / result["dense_seconds"]
    return result


def volume_net() -> tuple[torch.nn.Module, int]:
    """A small 3D patch classifier (22^3 voxels -> 2 scores): conv-pool-conv-pool-conv-FC."""
    from torch import nn

    model = nn.Sequential(nn.Conv3d(1, 8, 3), nn.ReLU(), nn.MaxPool3d(2), nn.Conv3d(8, 16, 3), nn.ReLU(),
                          nn.MaxPool3d(2), nn.Conv3d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 2 * 2 * 2, 2))
    return model, 22  # 22 -> 20 -> 10 -> 8 -> 4 -> 2


def volume_one(args) -> dict:
    """Runs in a fresh process: the 3D net on a side^3 volume, dense vs patch by patch on a subset."""
    from cnnkit.dense import densify, patch_by_patch

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, patch = volume_net()
    model.to(device).eval()
    side = int(args.size)
    dense = densify(model, patch, mode=args.mode)
    x = torch.randn(1, 1, side, side, side, device=device)
    n = side**3
    with torch.no_grad():
        y = dense(x)  # warm-up: layouts are timed and chosen here
        dense_s = _median_time(lambda: dense(x), args.reps, device)
        gen = torch.Generator().manual_seed(1)
        flat = torch.randperm(n, generator=gen)[: args.pixels]
        pos = torch.stack([flat // side**2, flat // side % side, flat % side], 1)

        def baseline():
            return patch_by_patch(model, x, patch, pixels=pos, batch_size=512)

        patch_by_patch(model, x, patch, pixels=pos[:64])  # warm-up
        t = _median_time(baseline, args.patch_reps, device)
        diff = (y[0][:, pos[:, 0], pos[:, 1], pos[:, 2]] - baseline()[0]).abs().max().item()
    flops = 2 * dense.macs((side,) * 3)
    return {"size": side, "threads": torch.get_num_threads(), "dense_seconds": dense_s,
            "patch_seconds": t * n / len(pos), "flop_ratio": 2 * dense.patch_macs() * n / flops,
            "max_abs_diff": diff, "layouts": [r["layout"] for r in dense.layers() if "layout" in r]}


def run_volume(args) -> None:
    """One line: the 3D patch net on a volume, dense beside patch by patch (extrapolated)."""
    side = "48" if args.quick else args.volume_size
    cmd = [sys.executable, __file__, "--volume-one", "--size", side, "--reps", str(args.reps),
           "--patch-reps", str(args.patch_reps), "--pixels", str(args.pixels), "--mode", args.mode,
           "--device", args.device]
    r = _run_json(cmd, "3D benchmark")
    print(f"3D net (22^3 patch) on a {side}^3 volume ({r['threads']} threads): dense {r['dense_seconds']:.3f} s, "
          f"patch by patch {r['patch_seconds']:.1f} s (from {args.pixels} voxels), speedup "
          f"{r['patch_seconds'] / r['dense_seconds']:.1f}, FLOP ratio {r['flop_ratio']:.1f}, "
          f"max abs difference {r['max_abs_diff']:.2e}; layouts {', '.join(r['layouts'])}")


def onnx_one(args) -> dict:
    """Runs in a fresh process: the dense net in PyTorch and its ONNX export in onnxruntime (CPU,
    the same number of threads), timed alternately on one image."""
    import tempfile

    import onnxruntime as ort

    from cnnkit.dense import densify, export_onnx
    from cnnkit.dense.allocator import retain_freed_memory
    from cnnkit.models import create_patch_net

    retain_freed_memory()
    torch.manual_seed(0)
    model, patch = create_patch_net(args.net)
    dense = densify(model.eval(), patch, mode=args.mode)
    w, h = (int(v) for v in args.size.split("x"))
    x = torch.randn(1, dense.in_channels, h, w)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(dense, os.path.join(tmp, "dense.onnx"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"image": x.numpy()}
    with torch.no_grad():
        ref = dense(x)  # warm-up: layouts chosen
        got = sess.run(None, feed)[0]
        torch_t, ort_t = [], []
        for _ in range(args.reps):
            torch_t.append(_median_time(lambda: dense(x), 1, torch.device("cpu")))
            ort_t.append(_median_time(lambda: sess.run(None, feed), 1, torch.device("cpu")))
    return {"net": args.net, "size": args.size, "threads": torch.get_num_threads(),
            "torch_seconds": statistics.median(torch_t), "ort_seconds": statistics.median(ort_t),
            "max_abs_diff": (torch.from_numpy(got) - ref).abs().max().item(),
            "ort_version": ort.__version__}


def run_onnx(net: str, size: str, args) -> None:
    """One line: onnxruntime CPU time beside PyTorch's (skipped without onnxruntime)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime: not installed (pip install onnx onnxruntime); ONNX timing skipped")
        return
    cmd = [sys.executable, __file__, "--onnx-one", "--net", net, "--size", size, "--reps", str(args.reps),
           "--mode", args.mode]
    r = _run_json(cmd, f"ONNX benchmark {net} {size}")
    print(f"ONNX on CPU, {r['net']} {r['size']} ({r['threads']} threads): onnxruntime {r['ort_version']} "
          f"{r['ort_seconds']:.3f} s, PyTorch dense {r['torch_seconds']:.3f} s (mode={args.mode}), ratio "
          f"{r['ort_seconds'] / r['torch_seconds']:.2f}; max abs difference {r['max_abs_diff']:.2e}")


def run_subprocess(net: str, size: str, args, max_memory: float | None) -> dict:
    cmd = [sys.executable, __file__, "--one", "--net", net, "--size", size, "--reps", str(args.reps),
           "--patch-reps", str(args.patch_reps), "--pixels", str(args.pixels), "--mode", args.mode,
           "--device", args.device, "--max-memory", str(int(max_memory or 0))]
    if args.default_malloc:
        cmd.append("--default-malloc")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, ["src", os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"benchmark {net} {size} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="descriptor net at 256x256 and 1080x720 only, fewer repetitions")
    p.add_argument("--nets", default=",".join(NETS))
    p.add_argument("--sizes", default=",".join(SIZES), help="W x H list")
    p.add_argument("--pixels", type=int, default=2000, help="patch-by-patch subset (default 2000)")
    p.add_argument("--reps", type=int, default=3, help="dense repetitions (median)")
    p.add_argument("--patch-reps", type=int, default=3, help="patch-by-patch repetitions (median)")
    p.add_argument("--mode", default="auto", choices=("auto", "dilated", "space_to_batch"))
    p.add_argument("--max-memory", type=float, default=1e9, help="tiled runs: bytes (default 1e9)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc malloc as it is (default: keep freed memory, see dense/allocator.py)")
    p.add_argument("--onnx-size", default="512x512",
                   help="W x H of the ONNX Runtime vs PyTorch line (descriptor net, CPU); empty: skip it")
    p.add_argument("--volume-size", default="128",
                   help="side of the 3D net's cubic volume (--quick: 48); empty: skip the 3D line")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--volume-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--onnx-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--net", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    if args.onnx_one:
        print(json.dumps(onnx_one(args)))
        return
    if args.volume_one:
        print(json.dumps(volume_one(args)))
        return
    nets, sizes = args.nets.split(","), args.sizes.split(",")
    if args.quick:
        nets, sizes = ["descriptor"], ["256x256", "1080x720"]
        args.reps, args.patch_reps = 2, 1
    malloc = ("default glibc malloc" if args.default_malloc
              else "malloc keeps freed memory (cnnkit/dense/allocator.py)")
    print(f"dense vs patch-by-patch on {args.device} ({torch.get_num_threads()} threads), mode={args.mode}, "
          f"{malloc}. Patch-by-patch is measured on {args.pixels} random pixels and scaled to all "
          "pixels; matmul GF/s is sustained between the dense repetitions. FLOPs: convolutions and "
          "FC layers (2 x MACs).")
    head = (f"{'net':<11}{'image':>9}{'dense s':>9}{'patch s':>10}{'speedup':>9}{'FLOP ratio':>11}"
            f"{'dense GF/s':>11}{'matmul GF/s':>12}{'peak MB':>9}{'tiled MB':>9}{'tiled s':>8}"
            f"{'max diff':>10}")
    print(head)
    rows = []
    for net in nets:
        for size in sizes:
            r = run_subprocess(net, size, args, None)
            tiled = run_subprocess(net, size, args, args.max_memory) if args.max_memory else None
            r["tiled_peak_mb"] = tiled["peak_mb"] if tiled else None
            r["tiled_seconds"] = tiled["dense_seconds"] if tiled else None
            rows.append(r)
            print(f"{net:<11}{size:>9}{r['dense_seconds']:>9.3f}{r['patch_seconds']:>10.1f}"
                  f"{r['speedup']:>9.1f}"
                  f"{r['flop_ratio']:>11.1f}{r['dense_gflops']:>11.1f}{r['matmul_gflops']:>12.1f}"
                  f"{r['peak_mb']:>9.0f}{(r['tiled_peak_mb'] or 0):>9.0f}{(r['tiled_seconds'] or 0):>8.2f}"
                  f"{r['max_abs_diff']:>10.2e}", flush=True)
    for r in rows:
        print(f"  {r['net']} {r['size']}: layouts {', '.join(r['layouts'])}")
    if args.onnx_size and args.device == "cpu":
        run_onnx("descriptor", args.onnx_size, args)
    if args.volume_size:
        run_volume(args)
    target = next((r for r in rows if r["net"] == "descriptor" and r["size"] == "1080x720"), None)
    if target:
        checks = [
            ("speedup >= 0.7 x FLOP ratio", target["speedup"] >= 0.7 * target["flop_ratio"],
             f"{target['speedup']:.1f} vs {0.7 * target['flop_ratio']:.1f}"),
            ("dense GFLOP/s >= 0.5 x matmul", target["dense_gflops"] >= 0.5 * target["matmul_gflops"],
             f"{target['dense_gflops']:.1f} vs {0.5 * target['matmul_gflops']:.1f}"),
            ("tiled peak < 2 GB", target["tiled_peak_mb"] is not None and target["tiled_peak_mb"] < 2048,
             f"{target['tiled_peak_mb']:.0f} MB"),
        ]
        print("descriptor net at 1080x720:")
        for name, ok, detail in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")


if __name__ == "__main__":
    main()
