"""``cnnkit demo``: the main job on embedded data, run by ``make demo``.

Stage 1 trains LeNet-5 (LeCun et al. 1998) on scikit-learn's bundled handwritten digits (1797 real
8x8 images, upsampled to 32x32), with the training set's mean image subtracted as the lecture says,
and reports its accuracy on held-out digits.

Stage 2 is the lecture's last part: a small patch classifier is trained densely on generated textured
shapes (the label of a pixel needs the context around it), turned into a dense network with
d-regularly sparse kernels, and labels every pixel of held-out images in one pass; the demo checks
that the dense output equals the patch classifier run patch by patch, and writes a picture.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cnnkit.cli.train import add_train_arguments, apply_threads, config_from_args

DEMO_DEFAULTS = dict(data="digits", model="lenet5", out="runs/demo", epochs=15, batch_size=32, lr=0.05,
                     momentum=0.9, weight_decay=5e-4, schedule="step", step_size=10, gamma=0.1, seed=0)


def run_demo(args: argparse.Namespace) -> int:
    from cnnkit.train.runner import TrainConfig, fit

    cfg = config_from_args(args, TrainConfig(**DEMO_DEFAULTS))
    apply_threads(args)
    print(f"[1] LeNet-5 on handwritten digits: {cfg.epochs} epochs of SGD (lr {cfg.lr}, momentum {cfg.momentum}), "
          f"mean-image subtraction; run folder {cfg.out}")
    t0 = time.perf_counter()
    # a second `make demo` continues (or just reports) the run already in the folder
    summary = fit(cfg, resume=args.resume or (Path(cfg.out) / "last.safetensors").exists())
    final = summary["final"]
    print(f"    held-out top-1 accuracy: {final['val_acc1']:.4f}  (top-1 error {1 - final['val_acc1']:.4f}) "
          f"in {time.perf_counter() - t0:.1f} s")
    out = Path(summary["out"])
    print(f"    wrote {out}/metrics.csv, curves.png, confusion.png, best.safetensors, last.safetensors")
    print(f"    try: cnnkit eval {out}/best.safetensors   |   cnnkit predict {out}/best.safetensors IMAGE.png")
    if args.skip_pixelwise:
        return 0
    from cnnkit.segmentation.demo import run_pixelwise_demo

    print("[2] pixelwise classification: a patch classifier (18x18 patches) trained densely on textured "
          "shapes, run as a dense network with d-regularly sparse kernels")
    t0 = time.perf_counter()
    px = run_pixelwise_demo(out / "pixelwise", seed=cfg.seed)
    print(f"    held-out pixel accuracy {px['pixel_accuracy']:.4f}, mean IoU {px['mean_iou']:.4f}; "
          f"{px['predict_seconds_per_image'] * 1000:.0f} ms per 64x64 image in one pass")
    print(f"    dense output vs patch-by-patch on 200 random pixels: max |difference| "
          f"{px['max_abs_diff_vs_patch_by_patch']:.2e} (exact up to float rounding); "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"    wrote {px['picture']} (image | truth | prediction)")
    return 0


def register(sub) -> None:
    from cnnkit.train.runner import TrainConfig

    p = sub.add_parser("demo", help="train LeNet-5 on the embedded digits and report held-out accuracy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # One thread: LeNet-5 on 32x32 images is too small to gain from intra-op parallelism, and two
    # threads stall badly when other jobs share the cores (3 epochs: 7.5 s with 1 thread, 45 s with 2).
    add_train_arguments(p, TrainConfig(**DEMO_DEFAULTS), threads=1)
    p.add_argument("--skip-pixelwise", action="store_true", help="run only stage 1 (LeNet-5 on digits)")
    p.set_defaults(func=run_demo)
