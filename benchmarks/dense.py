"""Dense pixelwise classification vs patch-by-patch (Li, Zhao, Wang arXiv:1412.4526).

For the lecture's toy net, the Simo-Serra descriptor net (64x64 patches, as in Bailer et al.) and a
Ciresan et al.'s membrane net N3 (65x65), on 256x256, 512x512 and 1080x720 images:

- dense time (median of repetitions, after one warm-up call that also picks the layouts);
- patch-by-patch time, measured on a random subset of pixels and scaled to all pixels;
- speedup, and the FLOP ratio of the two methods (the speedup's limit);
- the dense net's achieved GFLOP/s next to fp32 matrix-multiply GFLOP/s measured in the same run;
- peak memory of the first dense call above the process's state before it (resident-set
  high-water mark reset through /proc/self/clear_refs, one fresh subprocess per configuration;
  torch.cuda.max_memory_allocated on CUDA), untiled and under --max-memory (default: densify's
  default budget);
- the max abs difference between the dense output and patch-by-patch on the subset;
- on CPU, one line: the descriptor net's ONNX export (cnnkit.dense.export_onnx) in onnxruntime beside
  the PyTorch dense net, same image, same thread count (--onnx-size, default 512x512);
- one line for volumes: a small 3D patch net (22^3 voxels) on a 128^3 volume (--volume-size; 48 with
  --quick), dense vs patch by patch (on a subset of voxels, scaled), with the FLOP ratio.

- the budget table (descriptor net, --budget-size 1080x720): untiled, the default budget and
  --budgets (768 MB, 512 MB, 256 MB): budget, tiles, predicted and measured peak of a first call
  (layouts still to be timed) and of a later call, each budget in its own fresh process; time and
  speed against untiled, timed alternately in one process (--budgets-only runs just this table).

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


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


def _peak_start(device) -> float:
    """Start measuring a call's peak: CUDA's allocated-bytes peak, or the resident set's high-water
    mark reset to the current resident set (/proc/self/clear_refs; else ru_maxrss, whose earlier
    high-water mark may hide part of the call's peak)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:
        return _rss_mb()


def _peak_since(base: float, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - base
    try:
        return _status_mb("VmHWM") - base
    except (OSError, StopIteration):
        return _rss_mb() - base


def _budget(text: str | None) -> int | None:
    """--max-memory: bytes, "default" (densify's default budget) or "untiled" (no tiles)."""
    if text in (None, "", "default"):
        return None
    return 10**15 if text == "untiled" else int(float(text))


def _plan_json(plan) -> dict:
    return {"tile": plan.tile, "budget_mb": plan.budget / 2**20, "predicted_mb": plan.predicted / 2**20}


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
    max_memory = _budget(args.max_memory)
    dense = densify(model, patch, mode=args.mode, max_memory=max_memory)
    x = torch.randn(1, dense.in_channels, h, w, device=device)
    result = {"net": args.net, "size": args.size, "max_memory": args.max_memory,
              "threads": torch.get_num_threads(), "retained_malloc": retained}
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    with torch.no_grad():
        base = _peak_start(device)
        y = dense(x)  # first call: layouts are timed and chosen here
        result["peak_mb"] = _peak_since(base, device)
        result["plan"] = _plan_json(dense.last_plan)
        del y
        base = _peak_start(device)
        y = dense(x)  # a later call: layouts known, its own plan
        result["later_peak_mb"] = _peak_since(base, device)
        result["later_plan"] = _plan_json(dense.last_plan)
        dense_times, mm_rates = [], []
        for _ in range(args.reps):  # interleaved, so both see the same load on a shared machine
            dense_times.append(_median_time(lambda: dense(x), 1, device))
            mm_rates.append(matmul_rate(a, b, dense_times[-1], device))
        result["dense_seconds"] = statistics.median(dense_times)
        result["matmul_gflops"] = statistics.median(mm_rates)
        if args.max_memory == "untiled":
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


def budget_one(args) -> dict:
    """Runs in a fresh process: the descriptor net under one budget; the first call's peak and plan
    (layouts still to be timed), then a later call's (layouts known), or the budget's error."""
    from cnnkit.dense import densify
    from cnnkit.dense.allocator import retain_freed_memory
    from cnnkit.errors import ConfigError
    from cnnkit.models import create_patch_net

    if not args.default_malloc:
        retain_freed_memory()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, patch = create_patch_net("descriptor")
    dense = densify(model.to(device).eval(), patch, mode=args.mode, max_memory=_budget(args.max_memory))
    w, h = (int(v) for v in args.size.split("x"))
    x = torch.randn(1, dense.in_channels, h, w, device=device)
    out = {"max_memory": args.max_memory}
    with torch.no_grad():
        try:
            for name in ("first", "later"):
                base = _peak_start(device)
                y = dense(x)
                out[name] = {"peak_mb": _peak_since(base, device), **_plan_json(dense.last_plan)}
                del y
        except ConfigError as exc:
            out["error"] = str(exc)
    return out


def speed_one(args) -> dict:
    """Runs in a fresh process: the descriptor net untiled and in each of ``args.tiles``, timed
    alternately (median of ``args.reps``), so every ratio sees the same machine load."""
    from cnnkit.dense import densify
    from cnnkit.dense.allocator import retain_freed_memory
    from cnnkit.models import create_patch_net

    if not args.default_malloc:
        retain_freed_memory()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, patch = create_patch_net("descriptor")
    dense = densify(model.to(device).eval(), patch, mode=args.mode)
    w, h = (int(v) for v in args.size.split("x"))
    x = torch.randn(1, dense.in_channels, h, w, device=device)
    tiles = [None] + [tuple(t) for t in json.loads(args.tiles)]
    times: dict = {t: [] for t in tiles}
    with torch.no_grad():
        dense.tile_size = (h, w)
        dense(x)  # layouts chosen
        for _ in range(args.reps):
            for t in tiles:
                dense.tile_size = t or (h, w)  # one tile as large as the image: untiled
                times[t].append(_median_time(lambda: dense(x), 1, device))
    return {"seconds": [statistics.median(times[t]) for t in tiles], "threads": torch.get_num_threads()}


def run_budgets(args) -> list[dict]:
    """The budget table: each budget's peaks in a fresh process, then all speeds in one process."""
    size = args.budget_size
    rows = [_run_json([sys.executable, __file__, "--budget-one", "--size", size, "--max-memory", b,
                       "--mode", args.mode, "--device", args.device]
                      + (["--default-malloc"] if args.default_malloc else []), f"budget {b}")
            for b in ["untiled"] + args.budgets.split(",")]
    tiles = [r["later"]["tile"] for r in rows[1:] if "error" not in r and r["later"]["tile"]]
    speed = _run_json([sys.executable, __file__, "--speed-one", "--size", size, "--tiles", json.dumps(tiles),
                       "--reps", str(args.reps), "--mode", args.mode, "--device", args.device]
                      + (["--default-malloc"] if args.default_malloc else []), "budget speeds")
    seconds = dict(zip([None] + [tuple(t) for t in tiles], speed["seconds"]))
    print(f"\nmax_memory on the descriptor net at {size} ({args.device}, {speed['threads']} threads): peak "
          "memory above the process's state, first call (layouts timed) and a later call, each "
          "budget in a fresh process; times: median of alternating runs in one process")
    print(f"{'budget':<10}{'MB':>6} | {'1st: tile':>11}{'predicted':>10}{'peak':>6} | {'later: tile':>12}"
          f"{'predicted':>10}{'peak':>6} | {'time s':>7}{'vs untiled':>11}")
    for r in rows:
        name = r["max_memory"]
        if "error" in r:
            print(f"{name:<10}  error: {r['error']}")
            continue
        first, later = r["first"], r["later"]
        t = seconds.get(tuple(later["tile"]) if later["tile"] else None)
        budget = "-" if name == "untiled" else f"{later['budget_mb']:.0f}"

        def tile(p):
            return "x".join(map(str, p["tile"])) if p["tile"] else "whole"

        print(f"{name:<10}{budget:>6} | {tile(first):>11}{first['predicted_mb']:>10.0f}{first['peak_mb']:>6.0f} | "
              f"{tile(later):>12}{later['predicted_mb']:>10.0f}{later['peak_mb']:>6.0f} | "
              f"{t or 0:>7.2f}{seconds[None] / t if t else 0:>11.2f}")
        r["seconds"], r["speed"] = t, (seconds[None] / t if t else None)
    return rows


def run_subprocess(net: str, size: str, args, max_memory: str) -> dict:
    cmd = [sys.executable, __file__, "--one", "--net", net, "--size", size, "--reps", str(args.reps),
           "--patch-reps", str(args.patch_reps), "--pixels", str(args.pixels), "--mode", args.mode,
           "--device", args.device, "--max-memory", max_memory]
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
    p.add_argument("--max-memory", default="default",
                   help="the tiled column's budget: bytes, or 'default' (densify's default budget)")
    p.add_argument("--budgets", default="default,805306368,536870912,268435456",
                   help="budget table (descriptor net, --budget-size): bytes or 'default'; empty: skip")
    p.add_argument("--budget-size", default="1080x720", help="W x H of the budget table")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc malloc as it is (default: keep freed memory, see dense/allocator.py)")
    p.add_argument("--onnx-size", default="512x512",
                   help="W x H of the ONNX Runtime vs PyTorch line (descriptor net, CPU); empty: skip it")
    p.add_argument("--volume-size", default="128",
                   help="side of the 3D net's cubic volume (--quick: 48); empty: skip the 3D line")
    p.add_argument("--budgets-only", action="store_true", help="only the budget table")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--budget-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--speed-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tiles", help=argparse.SUPPRESS)
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
    if args.budget_one:
        print(json.dumps(budget_one(args)))
        return
    if args.speed_one:
        print(json.dumps(speed_one(args)))
        return
    if args.budgets_only:
        _budget_checks(run_budgets(args))
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
            r = run_subprocess(net, size, args, "untiled")
            tiled = run_subprocess(net, size, args, args.max_memory)
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
    budgets = run_budgets(args) if args.budgets else None
    target = next((r for r in rows if r["net"] == "descriptor" and r["size"] == "1080x720"), None)
    if target:
        checks = [
            ("speedup >= 0.7 x FLOP ratio", target["speedup"] >= 0.7 * target["flop_ratio"],
             f"{target['speedup']:.1f} vs {0.7 * target['flop_ratio']:.1f}"),
            ("dense GFLOP/s >= 0.5 x matmul", target["dense_gflops"] >= 0.5 * target["matmul_gflops"],
             f"{target['dense_gflops']:.1f} vs {0.5 * target['matmul_gflops']:.1f}"),
        ]
        print("descriptor net at 1080x720:")
        for name, ok, detail in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    if budgets:
        _budget_checks(budgets)


def _budget_checks(rows: list[dict]) -> None:
    """The issue's figures: every budget bounds both calls' peaks; with no budget given, the peak
    stays <= 1 GB (10^9 bytes) at >= 0.9x the untiled speed."""
    print("budgets:")
    for r in rows[1:]:
        if "error" in r:
            continue
        peak = max(r["first"]["peak_mb"], r["later"]["peak_mb"])
        budget = r["later"]["budget_mb"]
        print(f"  {'PASS' if peak <= budget else 'FAIL'}  {r['max_memory']}: peak {peak:.0f} MB <= budget "
              f"{budget:.0f} MB")
        if r["max_memory"] == "default":
            ok = peak * 2**20 <= 1e9
            print(f"  {'PASS' if ok else 'FAIL'}  default budget: peak {peak * 2**20 / 1e9:.3f} GB <= 1 GB")
            if r["speed"] is not None:
                print(f"  {'PASS' if r['speed'] >= 0.9 else 'FAIL'}  default budget: {r['speed']:.2f}x untiled "
                      "speed >= 0.9x")


if __name__ == "__main__":
    main()
