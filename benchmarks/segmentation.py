"""Pixelwise classification on real data, as a user runs it: `cnnkit segment train`, then `cnnkit segment eval`
on held-out test images, timed, with the scores beside the published figures.

- DRIVE retinal vessels (Staal et al. 2004): 20 training images (4 of them held out for model selection
  and the threshold), scored on the 20 test images inside the field of view, vessel = positive class.
  Published, patch classifiers: Liskowski & Krawiec 2016 ROC AUC 0.971-0.979; state of the art for
  patch classifiers F1 0.816 / AUC 0.979 (48x48 patches, overlapping predictions averaged); best
  reproducible whole-image networks F1 0.826 / AUC 0.986.
- Weizmann horses (Borenstein & Ullman): the 328 grey images with their figure/ground masks, the first
  200 for training (40 of them held out), the last 128 for testing; horse = positive class. No
  published figure is quoted for this split.

The data come from ../shared/data (see its README), or --drive / --horses. Each dataset runs the full
command line in a fresh process, so the times include loading, training, the held-out threshold and
the test pass with the 8 flips/rotations. Run from the repository root:
`python benchmarks/segmentation.py [--quick] [--only drive|horses] [--threads N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# The recipe for DRIVE: fundus contrast normalisation (CLAHE), the Liskowski-style 27x27 net at a quarter
# of its width, plain cross-entropy over every labelled pixel of 64x64 crops with the 8 flips/rotations and
# intensity jitter, Adam 3e-3 with a cosine schedule; the threshold is picked on the 4 held-out images.
DRIVE = ["--images", "images", "--masks", "1st_manual", "--valid", "mask", "--contrast", "clahe",
         "--model", "liskowski", "--option", "width=0.25", "--augment", "dihedral,intensity=0.1",
         "--class-weight", "none", "--lr", "3e-3", "--epochs", "40"]
HORSES = ["--images", "images", "--masks", "masks", "--mask-mode", "binary", "--model", "segment",
          "--epochs", "20"]
PUBLISHED = {"drive": "patch nets: F1 0.816 / AUC 0.979 (Liskowski & Krawiec 2016: AUC 0.971-0.979); "
                      "whole-image nets: F1 0.826 / AUC 0.986",
             "horses": "(no published figure quoted for this split)"}


def run(args: list[str], threads: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cnnkit", *args, ], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(args[:3])} failed:\n{done.stderr[-3000:]}")
    return done, time.perf_counter() - t0


def horses_folders(source: Path, root: Path) -> tuple[Path, Path]:
    """train/ and test/ folders of symbolic links: the first 200 images and the last 128."""
    images = sorted((source / "gray").glob("*.jpg"))
    for part, chosen in (("train", images[:200]), ("test", images[200:])):
        for sub in ("images", "masks"):
            (root / part / sub).mkdir(parents=True)
        for f in chosen:
            (root / part / "images" / f.name).symlink_to(f)
            (root / part / "masks" / f.name).symlink_to(source / "figure_ground" / f.name)
    return root / "train", root / "test"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drive", type=Path, default=SHARED / "drive")
    p.add_argument("--horses", type=Path, default=SHARED / "weizmann_horse")
    p.add_argument("--only", choices=["drive", "horses"], default=None)
    p.add_argument("--quick", action="store_true", help="2 epochs each: checks the pipeline, not the accuracy")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of the commands")
    p.add_argument("--out", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or Path(tmp)
        jobs = []
        if a.only in (None, "drive"):
            jobs.append(("drive", a.drive / "training", a.drive / "test", DRIVE, ["--valid", "mask", "--masks",
                                                                                  "1st_manual"]))
        if a.only in (None, "horses"):
            train, test = horses_folders(a.horses, Path(tmp) / "horses")
            jobs.append(("horses", train, test, HORSES, ["--masks", "masks", "--mask-mode", "binary"]))
        for name, train, test, recipe, eval_args in jobs:
            if not train.is_dir():
                print(f"{name}: {train} not found, skipped")
                continue
            recipe = [*recipe, "--epochs", "2"] if a.quick else recipe
            run_dir = out / name
            _, t_train = run(["segment", "train", "--data", str(train), *recipe, "--out", str(run_dir),
                              "--threads", str(a.threads)], a.threads)
            scores = run_dir / "test_scores.json"
            _, t_eval = run(["segment", "eval", str(run_dir / "best.safetensors"), "--data", str(test),
                             "--images", "images", *eval_args, "--out", str(scores)], a.threads)
            m = json.loads(scores.read_text())
            rows.append((name, m, t_train, t_eval))
    print(f"{'data':<8} {'F1':>6} {'ROC AUC':>8} {'pixel acc':>9} {'mean IoU':>8} {'train s':>8} {'test s':>7}  "
          "published")
    for name, m, t_train, t_eval in rows:
        print(f"{name:<8} {m['f1']:>6.4f} {m['roc_auc']:>8.4f} {m['pixel_accuracy']:>9.4f} {m['mean_iou']:>8.4f} "
              f"{t_train:>8.0f} {t_eval:>7.0f}  {PUBLISHED[name]}")


if __name__ == "__main__":
    main()
