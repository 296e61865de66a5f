"""``cnnkit segment train|predict|eval``: pixelwise classification from the shell (parsing only; the work is
in :mod:`cnnkit.segmentation`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnkit.cli.argtypes import (
    count,
    fraction,
    interval,
    nonnegative_float,
    palette,
    positive_float,
    positive_int,
    seed,
)
from cnnkit.cli.segment_predict import _Formatter, add_eval_parser, add_predict_parser
from cnnkit.cli.train import apply_threads, config_from_args

TRAIN_DESCRIPTION = """\
Train a patch classifier to label every pixel, densely (Li, Zhao, Wang arXiv:1412.4526): the loss over
every labelled pixel of a crop is one forward and backward pass of the dense network, exactly the sum of
the per-patch losses. It runs through the same engine as `cnnkit train`: a run folder (args.json,
config.toml, metrics.csv with held-out pixel metrics per epoch, curves.png, examples.png,
best/last.safetensors chosen on held-out images, heldout.json), --resume bit for bit, --config, --precision,
--threads, progress bars, and torchrun (crops sharded across processes).

Data: --data DIR with DIR/images and DIR/masks (names below), paired by exact name: an image NAME.png
pairs with the mask NAME.png, or with NAME_mask.png (suffixes _manual1, _mask, _label(s), _gt, _seg(mentation),
_annotation; image suffixes _training, _test, _image, _img are dropped first, so DRIVE's 21_training.tif
pairs with 21_manual1.gif). An image without its mask (or a mask without its image) is an error, or with
--skip-unpaired skipped and counted. Masks: class-index PNGs, binary 0/255 masks, or colour masks with
--palette. Held out: --val-data DIR (same subfolders) or a seeded --val-fraction of the images.

Volumes (--volume): each entry of DIR/images and DIR/masks is a multi-page TIFF (one page per Z slice) or a
subfolder of 2D slices (natural name order: slice2 before slice10), paired by name. --volume 3d trains a 3D
patch net (default segment3d) on blocks of --crop voxels a side; --volume 2.5d=K trains a 2D patch net on each
slice with K neighbouring slices a side as channels (edge slices replicated; 2.5d means K = 1). Geometric
augmentation and test-time averaging act in the slice plane only.

After training, for two classes, the probability threshold with the best F1 on the held-out images is
stored in best.safetensors; `cnnkit segment predict` uses it.

Examples:
  cnnkit segment train                                       # generated textured shapes, 3 classes
  cnnkit segment train --data drive/training --masks 1st_manual --valid mask --contrast clahe \\
      --model liskowski --option width=0.25 --out runs/drive
  cnnkit segment train --data em --model ciresan_n1 --augment dihedral,elastic,intensity=0.1
  cnnkit segment train --model mynets.retina:build --data retina       # your own patch net
  cnnkit segment train --data em3d --volume 3d --out runs/em3d        # volumes, 3D patch net segment3d
  cnnkit segment train --data em3d --volume 2.5d=2 --model segment     # 2D net, 2 slices a side as channels
  torchrun --nproc_per_node=2 -m cnnkit segment train --data em --out runs/em
"""


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. width=0.25)")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def add_train_parser(segsub) -> argparse.ArgumentParser:
    from cnnkit.segmentation.task import CLASS_WEIGHTS, SELECT, SegmentConfig

    d = SegmentConfig()
    p = segsub.add_parser("train", help="train a patch classifier for pixelwise labels (run folder, resume, torchrun)",
                          description=TRAIN_DESCRIPTION, formatter_class=_Formatter)
    g = p.add_argument_group("configuration file")
    g.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="settings file (TOML; a run's config.toml works); flags override it")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="DIR|generated",
                   help=f"folder with the image and mask subfolders, or 'generated' (default: {d.data})")
    g.add_argument("--images", default=None, help=f"image subfolder (default: {d.images})")
    g.add_argument("--masks", default=None, help=f"mask subfolder (default: {d.masks})")
    g.add_argument("--valid", default=None, help="subfolder of valid-region masks, e.g. DRIVE's field of view "
                   "(nonzero = valid; pixels outside are neither trained nor scored) (default: none)")
    g.add_argument("--val-data", default=None, metavar="DIR",
                   help="held-out images: a folder with the same subfolders (default: --val-fraction of --data)")
    g.add_argument("--val-fraction", type=interval("(0, 1)"), default=None,
                   help=f"seeded fraction of --data held out when there is no --val-data (default: {d.val_fraction})")
    g.add_argument("--mask-mode", choices=["auto", "index", "binary", "palette"], default=None,
                   help=f"how masks are read (default: {d.mask_mode})")
    g.add_argument("--palette", type=palette, default=None, metavar="R,G,B;R,G,B;...",
                   help="colour masks: colour i is class i (default: none)")
    g.add_argument("--ignore-value", type=count, default=None, help="mask value meaning unlabelled (default: none)")
    g.add_argument("--classes", dest="num_classes", type=positive_int, default=None,
                   help="number of classes (default: the largest mask value + 1, at least 2)")
    g.add_argument("--mask-suffix", default=None, help="the suffix of mask names, replacing the default list "
                   "(e.g. _gtFine_labelIds) (default: the list above)")
    g.add_argument("--image-suffix", default=None, help="the suffix of image names dropped before pairing "
                   "(e.g. _leftImg8bit) (default: the list above)")
    g.add_argument("--skip-unpaired", action="store_true", default=None,
                   help="skip (and count) images without a mask and masks without an image instead of stopping")
    g.add_argument("--resize-to-mask", action="store_true", default=None,
                   help="resize images whose size differs from their mask's to the mask's")
    g.add_argument("--scale", type=positive_float, default=None,
                   help="resize images and masks by this factor when loading (default: 1)")
    g.add_argument("--volume", default=None, metavar="3d|2.5d[=K]",
                   help="images are volumes (multi-page TIFFs or folders of slices): 3d = a 3D patch net on voxel "
                   "blocks; 2.5d=K = a 2D patch net on each slice with K neighbouring slices a side as channels "
                   f"(2.5d: K = 1); none = 2D images (default: {d.volume})")
    g.add_argument("--generated-count", type=positive_int, default=None,
                   help=f"images of the generated default (default: {d.generated_count})")
    g = p.add_argument_group("preprocessing and augmentation (the same preprocessing runs at prediction)")
    g.add_argument("--normalize", choices=["image", "none"], default=None,
                   help="'image': each image standardised per channel over its valid pixels (default: "
                   f"{d.normalize})")
    g.add_argument("--contrast", choices=["none", "clahe"], default=None,
                   help="contrast-limited adaptive histogram equalisation first, e.g. for fundus images "
                   f"(default: {d.contrast})")
    g.add_argument("--augment", default=None, metavar="SPEC",
                   help="joint image/mask augmentation: dihedral (8 flips/quarter turns), elastic[=ALPHA:SIGMA], "
                   f"intensity[=S], flip (left-right), or none (default: {d.augment})")
    g = p.add_argument_group("model and loss")
    g.add_argument("--model", default=None, metavar="NAME|MODULE:FUNCTION",
                   help="a patch net of the registry (segment, toy, descriptor, liskowski, ciresan_n1..n4, and "
                   "segment3d for --volume 3d; see `cnnkit models`) or your own package.module:function returning "
                   f"(module, patch_size) (default: {d.model}; segment3d with --volume 3d)")
    g.add_argument("--option", dest="model_options", type=_option, action="append", default=None,
                   metavar="KEY=VALUE", help="an option of the model's builder, e.g. width=0.25 or patch=32 "
                   "(repeatable)")
    g.add_argument("--border", choices=["reflect", "replicate", "zeros"], default=None,
                   help=f"how images are extended so that border pixels have a patch (default: {d.border})")
    g.add_argument("--crop", type=positive_int, default=None,
                   help=f"output pixels (voxels in 3D) per side of a training crop (default: {d.crop})")
    g.add_argument("--crops-per-image", type=count, default=None,
                   help="crops drawn from each training image per epoch; 0 = as many as cover the mean image's "
                   f"area once (default: {d.crops_per_image})")
    g.add_argument("--class-weight", choices=list(CLASS_WEIGHTS), default=None,
                   help="'balanced': each class weighted by its inverse pixel frequency in the training masks "
                   f"(default: {d.class_weight})")
    g.add_argument("--hard-fraction", type=interval("(0, 1]"), default=None,
                   help="train on this fraction of each crop's hardest labelled pixels (bootstrapping; 1 = all) "
                   f"(default: {d.hard_fraction})")
    g.add_argument("--positive-class", type=count, default=None,
                   help=f"two classes: the class F1, ROC AUC and the threshold are about (default: {d.positive_class})")
    g.add_argument("--select", choices=list(SELECT), default=None,
                   help="held-out score that picks best.safetensors; auto = ROC AUC for two classes, else mean "
                   f"IoU (default: {d.select})")
    g.add_argument("--threshold-tta", action=argparse.BooleanOptionalAction, default=None,
                   help="pick the held-out threshold on the mean of the 8 flips/quarter turns, as predict does "
                   f"(default: {d.threshold_tta})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=None, help=f"(default: {d.epochs})")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"crops per global batch, split over torchrun processes (default: {d.batch_size})")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default=None, help=f"(default: {d.optimizer})")
    g.add_argument("--lr", type=positive_float, default=None, help=f"learning rate (default: {d.lr})")
    g.add_argument("--momentum", type=fraction, default=None, help=f"SGD momentum (default: {d.momentum})")
    g.add_argument("--weight-decay", type=nonnegative_float, default=None,
                   help=f"L2 penalty (default: {d.weight_decay})")
    g.add_argument("--schedule", choices=["cosine", "step", "plateau", "none"], default=None,
                   help=f"learning-rate schedule (default: {d.schedule})")
    g.add_argument("--step-size", type=positive_int, default=None, help=f"(default: {d.step_size})")
    g.add_argument("--gamma", type=interval("(0, 1]"), default=None, help=f"(default: {d.gamma})")
    g.add_argument("--weight-average", choices=["none", "polyak", "ema"], default=None,
                   help=f"evaluate and save averaged weights (default: {d.weight_average})")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help=f"run folder (default: {d.out})")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                   "or start it when it has none yet")
    g.add_argument("--seed", type=seed, default=None, help=f"(default: {d.seed})")
    g.add_argument("--device", default=None, help=f"auto (CUDA when present), cpu, cuda, cuda:N (default: {d.device})")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help=f"autocast the dense forward pass (default: {d.precision})")
    g.add_argument("--dense-mode", choices=["auto", "dilated", "space_to_batch"], default=None,
                   help="layouts of the dense layers: timed per layer on this machine (auto), or fixed; fixed "
                   f"layouts make two fresh runs repeat bit for bit (default: {d.dense_mode})")
    g.add_argument("--max-memory", dest="max_memory_mb", type=positive_float, default=None, metavar="MB",
                   help="upper bound on each dense pass's peak memory above what the process already holds (resident "
                   "memory on CPU, allocated memory on CUDA): images are cut into the fewest tiles that fit, with "
                   "identical results (default: the output and padded image plus 512 MB for tiles, or half the free "
                   "memory if less; too small a value is an error naming the minimum)")
    g.add_argument("--workers", type=count, default=None, help=f"DataLoader worker processes (default: {d.workers})")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="intra-op CPU threads (default: one per core)")
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    from cnnkit.dense.allocator import retain_freed_memory
    from cnnkit.segmentation.task import SegmentConfig, fit_segmentation

    if args.model_options is not None:
        args.model_options = dict(args.model_options)
    cfg = config_from_args(args, SegmentConfig())
    apply_threads(args)
    retain_freed_memory()  # full-resolution maps: reuse pages (see cnnkit.dense.allocator)
    summary = fit_segmentation(cfg, resume=args.resume)
    if summary["is_main"]:
        _print_summary(summary)
    return 0


def _scores(row: dict, prefix: str = "val_") -> str:
    keys = [k for k in ("pixel_accuracy", "mean_iou", "f1", "roc_auc") if f"{prefix}{k}" in row]
    return ", ".join(f"{k.replace('_', ' ')} {row[prefix + k]:.4f}" for k in keys)


def _print_summary(summary: dict) -> None:
    final, best = summary["final"], summary["best"]
    print(f"held-out after epoch {final['epoch']}: {_scores(final)}; best epoch {best['epoch']}: {_scores(best)}")
    held = summary.get("heldout")
    if held and "best_threshold" in held:
        print(f"held-out threshold {held['best_threshold']:.4f} (F1 {held['best_threshold_f1']:.4f}; ROC AUC "
              f"{held['roc_auc']:.4f}), stored in {summary['best_checkpoint']}")
    print(f"run folder: {summary['out']} (metrics.csv, curves.png, examples.png, config.toml, best/last.safetensors)")
    print(f"label images: cnnkit segment predict {summary['best_checkpoint']} --images IMAGES --out LABELS")


def register(sub: argparse._SubParsersAction) -> None:
    seg = sub.add_parser("segment", help="pixelwise classification: train a patch classifier, label images, score",
                         description="Pixelwise classification with a patch classifier run densely "
                         "(Li, Zhao, Wang arXiv:1412.4526): exact, one pass per image.")
    segsub = seg.add_subparsers(dest="segment_command", metavar="ACTION", parser_class=type(seg))
    seg.set_defaults(func=lambda a: seg.print_help() or 2)
    add_train_parser(segsub)
    add_predict_parser(segsub)
    add_eval_parser(segsub)

