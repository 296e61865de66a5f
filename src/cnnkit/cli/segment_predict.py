"""``cnnkit segment predict`` and ``cnnkit segment eval``: argument parsing only (the work is in
:mod:`cnnkit.segmentation.predict`). The ``segment`` group adds them with ``add_predict_parser`` and
``add_eval_parser``."""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from pathlib import Path

import torch

from cnnkit.cli.argtypes import count, palette, positive_float, positive_int
from cnnkit.cli.train import apply_threads
from cnnkit.errors import ConfigError
from cnnkit.utils import output_folder, resolve_device, write_json_atomic


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default (an on/off flag's as "off"); a help text that states its default in words keeps
    its own wording, and a required option has none to show. Descriptions keep their paragraphs, and
    indented lines (examples) are printed as written."""

    def _get_help_string(self, action):
        if action.required or "default:" in (action.help or ""):
            return action.help
        if isinstance(action, argparse._StoreTrueAction) or (action.nargs == 0 and action.default is None):
            return f"{action.help} (default: off)"
        if isinstance(action, argparse.BooleanOptionalAction) and isinstance(action.default, bool):
            return f"{action.help} (default: {'on' if action.default else 'off'})"
        if action.default is None and action.option_strings:
            return f"{action.help} (default: none)"
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        out = []
        for para in text.strip("\n").split("\n\n"):
            lines = para.splitlines()
            raw = [line for line in lines[1:] if line.startswith(" ")]
            if raw:  # a heading line and its indented lines: as written
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(textwrap.fill(" ".join(line.strip() for line in lines), width, initial_indent=indent,
                                         subsequent_indent=indent, break_on_hyphens=False))
        return "\n\n".join(out)


def _threshold(text: str):
    if text in ("auto", "argmax"):
        return None if text == "argmax" else "auto"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, argmax or a probability in [0, 1]")
    return value


def _positive(text: str):
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto or a class index") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="`cnnkit segment train` checkpoints; several are averaged (same classes)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="average over the flips and quarter turns training used (up to 8 dense passes per image; "
                   "for volumes those of the slice plane, depth is never flipped)")
    p.add_argument("--threshold", type=_threshold, default="auto", metavar="auto|argmax|FLOAT",
                   help="two classes: predict the positive class when its probability is >= this; auto = "
                   "the checkpoint's tuned threshold")
    p.add_argument("--model", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="allow a checkpoint to build its net by importing this code (repeatable; default: "
                   "none, such checkpoints are refused)")
    p.add_argument("--max-memory", type=positive_float, default=None, metavar="MB",
                   help="upper bound on each dense pass's peak memory above what the process already holds (resident "
                   "memory on CPU, allocated memory on CUDA): images are cut into the fewest tiles that fit, with "
                   "identical results (default: the output and padded image plus 512 MB for tiles, or half the free "
                   "memory if less; too small a value is an error naming the minimum)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="intra-op CPU threads (default: one per core)")


def add_predict_parser(segsub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = segsub.add_parser("predict", help="label images: label PNGs, probability maps, overlays",
                          formatter_class=_Formatter,
                          description="Write <stem>_labels.png (class index), <stem>_prob.png (16-bit "
                          "probability of the positive class; <stem>_prob_<k>.png per class for more than two) "
                          "and <stem>_overlay.png per image. Images whose outputs all exist are skipped, so an "
                          "interrupted run resumes. Under torchrun each process labels its share of the images. "
                          "A checkpoint trained with --volume labels volumes: --images takes multi-page TIFFs and "
                          "folders of volumes (TIFFs and subfolders of slices), and <stem>_labels.tif and "
                          "<stem>_prob.tif are multi-page TIFFs, one page per slice (no overlay).")
    _common(p)
    p.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files or folders")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--valid", default=None, metavar="DIR",
                   help="folder of valid-region masks paired to the images by name; preprocessing takes its "
                   "statistics inside (default: none, the whole image)")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    p.set_defaults(func=run_predict)
    return p


def add_eval_parser(segsub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = segsub.add_parser("eval", help="score checkpoints on images with masks",
                          formatter_class=_Formatter,
                          description="Per-class IoU, precision, recall and F1, mean IoU, pixel accuracy, and "
                          "for two classes F1 and ROC AUC of the positive class, over the labelled pixels "
                          "inside the valid regions. With a checkpoint trained with --volume, the subfolders hold "
                          "volumes (multi-page TIFFs or subfolders of slices) and every labelled voxel counts.")
    _common(p)
    p.add_argument("--data", required=True, metavar="DIR", help="folder with the image and mask subfolders")
    p.add_argument("--images", default="images", help="image subfolder of --data")
    p.add_argument("--masks", default="masks", help="mask subfolder of --data")
    p.add_argument("--valid", default=None, help="subfolder of valid-region masks (default: none)")
    p.add_argument("--positive-class", type=_positive, default="auto", metavar="auto|INT",
                   help="class scored by F1 and ROC AUC (two classes); auto = the checkpoint's")
    p.add_argument("--mask-mode", choices=["auto", "index", "binary", "palette"], default=None,
                   help="how masks are read (default: the checkpoint's)")
    p.add_argument("--palette", type=palette, default=None, metavar="R,G,B;R,G,B;...",
                   help="colour masks: colour i is class i (default: the checkpoint's)")
    p.add_argument("--ignore-value", type=count, default=None,
                   help="mask value of unlabelled pixels (default: the checkpoint's)")
    p.add_argument("--out", default=None, metavar="JSON", help="also write the scores here (default: none)")
    p.set_defaults(func=run_eval)
    return p


def _segmenter(args, device: torch.device):
    from cnnkit.segmentation.predict import Segmenter

    max_memory = None if args.max_memory is None else int(args.max_memory * 2**20)
    if max_memory is not None and max_memory <= 0:
        raise ConfigError(f"--max-memory {args.max_memory}: give a positive number of MB")
    return Segmenter(args.checkpoints, tta=args.tta, max_memory=max_memory, device=device,
                     threshold=args.threshold, allow_code=args.model)


def run_predict(args) -> int:
    from cnnkit.segmentation.data import VALID_KEY_SUFFIXES, pair_files
    from cnnkit.segmentation.predict import image_files, predict_files

    # under torchrun every process labels files[rank::world]; no process group is needed
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    apply_threads(args)
    device = resolve_device(args.device)
    if world > 1 and args.device == "auto" and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    segmenter = _segmenter(args, device)
    if segmenter.volume is not None:
        return _predict_volumes(args, segmenter, rank, world)
    files = image_files(args.images)
    valid = None
    if args.valid:
        pairs, _ = pair_files(files, image_files([args.valid]), "valid-region mask", suffixes=VALID_KEY_SUFFIXES)
        valid = [v for _, v in pairs]
    with output_folder(args.out, keep_complete=True):  # a failure leaves no new empty folder
        summary = predict_files(segmenter, files, args.out, valid_files=valid, rank=rank, world_size=world,
                                overwrite=args.overwrite)
    who = f"process {rank} of {world}: " if world > 1 else ""
    skipped = f"; skipped {summary.skipped} whose outputs exist" if summary.skipped else ""
    print(f"{who}wrote the outputs of {summary.written} images to {args.out}{skipped}")
    return 0


def _no_valid(args, segmenter) -> None:
    if args.valid:
        raise ConfigError(f"--valid: {segmenter.members[0].source} labels volumes, which have no valid-region "
                          "masks; drop --valid")


def _predict_volumes(args, segmenter, rank: int, world: int) -> int:
    from cnnkit.segmentation.predict import predict_volumes
    from cnnkit.segmentation.volume import volume_items

    _no_valid(args, segmenter)
    volumes = volume_items(args.images)
    with output_folder(args.out, keep_complete=True):
        summary = predict_volumes(segmenter, volumes, args.out, rank=rank, world_size=world, overwrite=args.overwrite)
    who = f"process {rank} of {world}: " if world > 1 else ""
    skipped = f"; skipped {summary.skipped} whose outputs exist" if summary.skipped else ""
    print(f"{who}wrote the label volumes of {summary.written} volumes to {args.out}{skipped}")
    return 0


def _eval_volumes(args, segmenter) -> dict:
    from cnnkit.segmentation.data import pair_files
    from cnnkit.segmentation.predict import evaluate_volumes
    from cnnkit.segmentation.volume import volume_paths

    _no_valid(args, segmenter)
    root = Path(args.data)
    volumes = volume_paths(root / args.images, "image")
    pairs, _ = pair_files(volumes, volume_paths(root / args.masks, "mask"), "mask volume")
    return evaluate_volumes(segmenter, [v for v, _ in pairs], [m for _, m in pairs], positive=args.positive_class,
                            mask_mode=args.mask_mode, palette=args.palette, ignore_value=args.ignore_value)


def run_eval(args) -> int:
    from cnnkit.segmentation.data import VALID_KEY_SUFFIXES, pair_files
    from cnnkit.segmentation.predict import evaluate_files, image_files

    if args.out and Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give the path of a JSON file to write the scores to")
    apply_threads(args)
    segmenter = _segmenter(args, resolve_device(args.device))
    if segmenter.volume is not None:
        metrics = _eval_volumes(args, segmenter)
    else:
        root = Path(args.data)
        files = image_files([root / args.images])
        pairs, _ = pair_files(files, image_files([root / args.masks]), "mask")
        valid = None
        if args.valid:
            valid_pairs, _ = pair_files(files, image_files([root / args.valid]), "valid-region mask",
                                        suffixes=VALID_KEY_SUFFIXES)
            valid = [v for _, v in valid_pairs]
        metrics = evaluate_files(segmenter, files, [m for _, m in pairs], valid, positive=args.positive_class,
                                 mask_mode=args.mask_mode, palette=args.palette, ignore_value=args.ignore_value)
    print(format_scores(metrics))
    print(format_table(metrics))
    if args.out:
        write_json_atomic(args.out, _json_safe(metrics))
        print(f"wrote {args.out}")
    return 0


def _num(v) -> str:
    return "-" if v is None or v != v else f"{v:.4f}"


def format_scores(m: dict) -> str:
    """One line: the headline scores and what they were measured on."""
    keys = [k for k in ("pixel_accuracy", "mean_iou", "f1", "roc_auc") if k in m]
    threshold = "argmax" if m["threshold"] is None else f"threshold {m['threshold']:.4g}"
    images, pixels = ("volumes", "voxels") if m.get("volumes") else ("images", "pixels")
    return ("  ".join(f"{k} {_num(m[k])}" for k in keys)
            + f"  ({m['images']} {images}, {m['pixels']} {pixels}, {threshold}, TTA {'on' if m['tta'] else 'off'})")


def format_table(m: dict) -> str:
    names = [str(i) if str(c) == str(i) else f"{i} {c}" for i, c in enumerate(m["classes"])]
    width = max(len("class"), *(len(n) for n in names))
    rows = [f"{'class':<{width}}  {'IoU':>6}  {'prec.':>6}  {'recall':>6}  {'F1':>6}"]
    for i, name in enumerate(names):
        cells = (m[k][i] for k in ("per_class_iou", "per_class_precision", "per_class_recall", "per_class_f1"))
        rows.append(f"{name:<{width}}  " + "  ".join(f"{_num(v):>6}" for v in cells))
    return "\n".join(rows)


def _json_safe(obj):
    """NaN (an undefined score) becomes null: JSON has no NaN."""
    if isinstance(obj, float):
        return None if obj != obj else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
