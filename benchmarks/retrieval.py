"""`cnnkit retrieve` on a CIFAR-10-sized set: the streaming exact ranking against the old full sort.

    python benchmarks/retrieval.py [--train 50000] [--test 10000] [--subset 500] [--keep DIR]

Builds, in a temporary folder: a synthetic set in the CIFAR-10 python-batch format that
``cnnkit.data.cifar`` reads (``--train`` + ``--test`` random 32x32x3 uint8 images, each a class
pattern under stronger uniform noise, so that ranking is neither chance nor trivial; the point is the
size), and a
LeNet-5 checkpoint (``cnnkit train``'s default model) trained for one epoch on a 512-image set of the
same kind. Then, each in a fresh process, timed (wall, and CPU seconds: user + system, which depend
less on what else the machine runs) with its peak resident memory (the child's ``ru_maxrss`` from
``os.wait4``, the per-child form of ``getrusage(RUSAGE_CHILDREN)``):

1. ``cnnkit retrieve CKPT --data DIR`` exactly as a user runs it, all queries;
2. the same with ``--queries S`` (``--subset``, default 500): also runs the pixel baseline;
3. the old algorithm (copied below from cnnkit before issue 13: features extracted item by item,
   every image's raw pixels held as float32, every query's whole database ranked by a stable full
   sort) on the same S queries.

2 and 3 must give the same scores in every row (features and pixels, raw and L2-normalised). The old
algorithm's time on all queries is extrapolated from 3 (its extraction and pixel phases as measured,
its ranking scaled by queries), and stated as such: it took over ten minutes when measured whole.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------- the data and the checkpoint


def write_cifar(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """CIFAR-10 python batches: data_batch_1..5 (train), test_batch, batches.meta; pickle protocol 2."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 48, (10, 3072), dtype=np.uint8)  # one per class: R, G, B planes
    folder.mkdir(parents=True, exist_ok=True)

    def batch(name: str, n: int) -> None:
        labels = rng.integers(0, 10, n)
        data = patterns[labels] + rng.integers(0, 208, (n, 3072), dtype=np.uint8)  # (n, 3072) uint8
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, fh, protocol=2)

    sizes = np.diff(np.linspace(0, n_train, 6).round().astype(int))
    for i, n in enumerate(sizes, start=1):
        batch(f"data_batch_{i}", int(n))
    batch("test_batch", n_test)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES]}, fh, protocol=2)
    return folder


def train_checkpoint(root: Path) -> Path:
    tiny = write_cifar(root / "tiny", 512, 128, seed=1)
    out = root / "lenet5"
    run([*cnnkit_command(), "train", "--data", str(tiny), "--epochs", "1", "--out", str(out),
         "--device", "cpu"], "cnnkit train")
    return out / "last.safetensors"


# --------------------------------------------------------------------------- measuring a process


def run(cmd: list[str], what: str) -> dict:
    """Run ``cmd`` in a fresh process; its wall time, peak RSS (MB) and stdout. Exits on failure."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN for one child)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{what} failed ({proc.returncode}):\n{err.read()}")
        return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024,
                "stdout": out.read()}  # Linux: ru_maxrss in KiB


def cnnkit_command() -> list[str]:
    """The ``cnnkit`` script beside this Python (as a user runs it), else ``python -c`` calling its main."""
    script = Path(sys.executable).with_name("cnnkit")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from cnnkit.cli import main; sys.exit(main())"]


# --------------------------------------------------------------------------- the old algorithm


def old_evaluate(queries, query_labels, database, database_labels, *, metric, ks, chunk=64):
    """evaluate_retrieval as it was: each chunk's whole ranking by a stable sort, relevance as float64."""
    import torch

    from cnnkit.analysis.retrieval import distances

    ks = sorted({min(int(k), len(database)) for k in ks})
    ap, hits_at = [], {k: [] for k in ks}
    positions = torch.arange(1, len(database) + 1, dtype=torch.float64)
    for q, ql in zip(queries.split(chunk), query_labels.split(chunk)):
        order = distances(q, database, metric).sort(dim=1, stable=True).indices  # (q, N) nearest first
        relevant = (database_labels[order] == ql[:, None]).double()
        precision = relevant.cumsum(1) / positions
        n_rel = relevant.sum(1)
        ap.append(torch.where(n_rel > 0, (precision * relevant).sum(1) / n_rel.clamp_min(1), 0.0))
        for k in ks:
            hits_at[k].append(relevant[:, :k].mean(1))
    ap = torch.cat(ap)
    return {"map": float(ap.mean()), **{f"precision@{k}": float(torch.cat(v).mean()) for k, v in hits_at.items()}}


def old_main(checkpoint: str, data: str, subset: int, ks=(1, 5, 10)) -> None:
    """The old run_retrieval's scoring, on the queries ``--queries subset`` keeps; prints JSON."""
    import torch
    from torch.utils.data import DataLoader

    from cnnkit.analysis.common import checkpoint_splits
    from cnnkit.analysis.retrieval import _prepare, l2_normalise, query_subset
    from cnnkit.data import labels_of
    from cnnkit.models import extract_features

    @torch.no_grad()
    def features(model, dataset, layer, mean):
        model.eval()
        chunks = [extract_features(model, x - mean, [layer])[layer].flatten(1).float()
                  for x, _ in DataLoader(dataset, batch_size=256, shuffle=False)]
        return torch.cat(chunks)

    t0 = time.perf_counter()
    ckpt, model, layer = _prepare(checkpoint, "cpu", None)
    splits = checkpoint_splits(ckpt, data)
    database = features(model, splits.train, layer, ckpt.mean_image)
    queries = features(model, splits.val, layer, ckpt.mean_image)
    db_labels, q_labels = labels_of(splits.train), labels_of(splits.val)
    t1 = time.perf_counter()
    pixels = [torch.cat([(x - ckpt.mean_image).flatten(1) for x, _ in DataLoader(d, batch_size=512)])
              for d in (splits.val, splits.train)]
    t2 = time.perf_counter()
    index = query_subset(len(queries), subset)
    index = torch.arange(len(queries)) if index is None else index
    rows = []
    for source, (q, db) in [(layer, (queries, database)), ("pixels", pixels)]:
        for norm in ("none", "l2"):
            f = l2_normalise if norm == "l2" else (lambda x: x)
            scores = old_evaluate(f(q[index]), q_labels[index], f(db), db_labels, metric="euclidean", ks=ks)
            rows.append({"features": source, "normalisation": norm, **scores})
    t3 = time.perf_counter()
    print(json.dumps({"rows": rows, "queries": len(index), "all_queries": len(queries),
                      "extract_s": t1 - t0, "pixels_s": t2 - t1, "rank_s": t3 - t2}))


# --------------------------------------------------------------------------- the comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=50_000, help="database images (default 50000)")
    parser.add_argument("--test", type=int, default=10_000, help="query images (default 10000)")
    parser.add_argument("--subset", type=int, default=500, help="queries of the side-by-side check (default 500)")
    parser.add_argument("--keep", type=Path, help="build (or reuse) the data and checkpoint here, not in a temp folder")
    parser.add_argument("--old", nargs=3, metavar=("CKPT", "DATA", "SUBSET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.old:
        return old_main(args.old[0], args.old[1], int(args.old[2]))

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        data = root / "cifar"
        if not (data / "test_batch").is_file():
            write_cifar(data, args.train, args.test)
        ckpt = root / "lenet5" / "last.safetensors"
        if not ckpt.is_file():
            ckpt = train_checkpoint(root)
        cli = [*cnnkit_command(), "retrieve", str(ckpt), "--data", str(data), "--device", "cpu",
               "--json", "--out"]
        load = os.getloadavg()[0]
        new = run(cli + [str(root / "r_all")], "cnnkit retrieve")
        part = run(cli + [str(root / "r_part"), "--queries", str(args.subset)], "cnnkit retrieve --queries")
        old = run([sys.executable, __file__, "--old", str(ckpt), str(data), str(args.subset)], "the old algorithm")
        load = max(load, os.getloadavg()[0])

    result, part_result, old_result = (json.loads(r["stdout"]) for r in (new, part, old))
    s, n = old_result["queries"], old_result["all_queries"]
    old_all = old_result["extract_s"] + old_result["pixels_s"] + old_result["rank_s"] * n / s
    print(f"{result['database']} database x {result['queries']} query images, CIFAR-10 format; LeNet-5 layer "
          f"{result['layer']} ({result['dimensions']} dimensions), euclidean; {os.cpu_count()} CPUs, "
          f"load average up to {load:.1f} during the run (other work shares this machine)")
    print(f"{'run':<48} {'queries':>7} {'wall s':>8} {'CPU s':>8} {'peak MB':>8}")
    for name, r, q in [("cnnkit retrieve (streaming, exact)", new, n),
                       (f"cnnkit retrieve --queries {s}", part, s),
                       (f"old algorithm, {s} queries (measured)", old, s)]:
        print(f"{name:<48} {q:>7} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['peak_mb']:8.0f}")
    print(f"{'old algorithm, all queries (extrapolated)':<48} {n:>7} {old_all:8.1f} {'-':>8} {'-':>8}")
    print(f"  old phases: loading and extraction {old_result['extract_s']:.1f} s, pixels "
          f"{old_result['pixels_s']:.1f} s, ranking {old_result['rank_s']:.1f} s for {s} queries "
          f"(x {n / s:.0f} for all)")
    print(f"speedup on all queries: {old_all / new['wall_s']:.1f}x (old extrapolated); peak memory "
          f"{old['peak_mb'] / new['peak_mb']:.1f}x less")
    if "pixels_skipped" in result:
        print(f"pixel baseline skipped on all queries: {result['pixels_skipped']}")
    keys = [k for k in old_result["rows"][0] if k == "map" or k.startswith("precision@")]
    print(f"\nthe same {s} queries, new (--queries {s}) against old:")
    worst = 0.0
    for a, b in zip(part_result["rows"], old_result["rows"]):
        diff = max(abs(a[k] - b[k]) for k in keys)
        worst = max(worst, diff)
        print(f"  {a['features']:<8} {a['normalisation']:<5} " + " ".join(f"{k} {a[k]:.6f}" for k in keys)
              + f"   max |new - old| {diff:.1e}")
    print("all queries: " + ", ".join(f"{r['features']} {r['normalisation']} mAP {r['map']:.4f}"
                                       for r in result["rows"]))
    if worst > 1e-12:
        raise SystemExit(f"new and old scores differ by {worst:.1e}")


if __name__ == "__main__":
    main()
