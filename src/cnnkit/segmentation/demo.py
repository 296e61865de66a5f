"""The pixelwise stage of ``cnnkit demo``: train a patch classifier densely on the generated textured
shapes through the one training engine (a run folder like any other), label unseen images in one
dense pass each, check the dense output against the patch classifier run patch by patch, and show
image | truth | prediction."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnkit.dense.baseline import patch_by_patch
from cnnkit.segmentation.augment import preprocess
from cnnkit.segmentation.data import generate_textured_shapes
from cnnkit.segmentation.metrics import SegmentationMeter
from cnnkit.segmentation.predict import Segmenter
from cnnkit.segmentation.task import SegmentConfig, fit_segmentation
from cnnkit.utils import atomic_path

log = logging.getLogger(__name__)

COLOURS = np.array([(40, 40, 40), (230, 25, 75), (60, 180, 75), (0, 130, 200)], dtype=np.uint8)


@contextlib.contextmanager
def _threads(n: int):
    """64 x 64 maps with 12 channels: OpenMP hand-offs cost more than the work; one thread is
    faster (measured 11 ms vs 18-240 ms per image on a shared 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_pixelwise_demo(out_dir: Path, seed: int = 0) -> dict:
    """Train (about 15 s on one core) into the run folder ``out_dir``, evaluate on 8 unseen generated
    images and write ``pixelwise_demo.png``. Returns pixel accuracy, mean IoU, per-class IoU, the largest
    difference between the dense output and patch-by-patch on sampled pixels, timings and the picture."""
    cfg = SegmentConfig(data="generated", generated_count=40, val_fraction=0.2, model="segment",
                        model_options={"width": 12, "patch": 18}, epochs=20, lr=3e-3, batch_size=2, crop=64,
                        crops_per_image=1, out=str(out_dir), seed=seed, threshold_tta=False)
    test = generate_textured_shapes(8, 64, seed=seed + 1000)
    with _threads(1):
        start = time.perf_counter()
        summary = fit_segmentation(cfg, resume=(Path(cfg.out) / "last.safetensors").exists(), progress=False)
        train_seconds = time.perf_counter() - start
        segmenter = Segmenter(summary["best_checkpoint"], tta=False)
        meter = SegmentationMeter(3)
        preds = []
        start = time.perf_counter()
        for s in test:
            probs = segmenter.probabilities(s.image)
            meter.update(probs[None], s.target[None])
            preds.append(segmenter.labels(probs))
        predict_seconds = time.perf_counter() - start
        # the dense output is the patch classifier's, exactly: check 200 random pixels
        member = segmenter.members[0]
        model, patch = member.dense.model, member.dense.patch
        x = preprocess(test[0].image, None, **member.preprocess)[None]
        pos = torch.randint(0, 64, (200, 2), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = patch_by_patch(model, x, patch, border=cfg.border, pixels=pos)
            got = member.dense(x)[0][:, pos[:, 0], pos[:, 1]]
        diff = (got - ref[0]).abs().max().item()
    metrics = meter.compute()
    picture = Path(summary["out"]) / "pixelwise_demo.png"
    _write_picture(picture, [s.image for s in test[:4]], [s.target for s in test[:4]], preds[:4])
    result = {"pixel_accuracy": metrics["pixel_accuracy"], "mean_iou": metrics["mean_iou"],
              "per_class_iou": metrics["per_class_iou"], "final_loss": summary["final"]["train_loss"],
              "max_abs_diff_vs_patch_by_patch": diff, "train_seconds": train_seconds,
              "predict_seconds_per_image": predict_seconds / len(test), "picture": str(picture),
              "run": summary["out"]}
    log.info("pixelwise demo: pixel accuracy %.3f, mean IoU %.3f", result["pixel_accuracy"],
             result["mean_iou"])
    return result


def _write_picture(path: Path, images, targets, preds) -> None:
    """One row per image: image | truth | prediction, 3x enlarged."""
    rows = []
    for img, tgt, pred in zip(images, targets, preds):
        rgb = (img.clamp(0, 1).numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([rgb, gap, COLOURS[tgt.clamp_min(0).numpy()], gap,
                                    COLOURS[pred.numpy()]], 1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    canvas = np.concatenate(rows[:-1], 0)
    im = Image.fromarray(canvas).resize((canvas.shape[1] * 3, canvas.shape[0] * 3), Image.NEAREST)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
