"""``cnnkit densify``: turn a patch net into its dense version, show it, and check it against
patch-by-patch (the pixelwise application itself is ``cnnkit segment``, in cli/segment.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cnnkit.cli.argtypes import positive_int, seed
from cnnkit.dense.allocator import retain_freed_memory
from cnnkit.errors import ConfigError, OutputError
from cnnkit.models import PATCH_NETS, create_patch_net
from cnnkit.utils import resolve_device, seed_everything


def register(sub: argparse._SubParsersAction) -> None:
    de = sub.add_parser("densify", help="convert a patch net to a dense one and check it",
                        description="Print the dense version of a patch net (layers, dilations, chosen "
                        "layout) and, with --check, compare it with patch-by-patch on random pixels of a "
                        "random image or of --image.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    de.add_argument("--net", default="toy", metavar="NAME",
                    help=f"a patch net: {', '.join(PATCH_NETS)} (`cnnkit models` shows their papers), "
                    "or your own as package.module:function returning (module, patch_size)")
    de.add_argument("--checkpoint", default=None,
                    help="a `cnnkit segment train` checkpoint instead of --net (its net, weights, border)")
    de.add_argument("--model", action="append", default=[], metavar="MODULE:FUNCTION",
                    help="allow --checkpoint to build its net by importing this code")
    de.add_argument("--patch", type=positive_int, default=None, help="patch size (default: the net's own)")
    de.add_argument("--check", action="store_true", help="verify pixels against patch-by-patch")
    de.add_argument("--image", default=None, metavar="FILE",
                    help="check on this image (preprocessed as the checkpoint says) instead of a random one")
    de.add_argument("--size", default="64x64", help="random test image HxW")
    de.add_argument("--pixels", type=positive_int, default=200, help="pixels to verify")
    de.add_argument("--mode", choices=("auto", "dilated", "space_to_batch"), default="auto")
    de.add_argument("--border", choices=("zeros", "reflect", "replicate"), default=None,
                    help="image border (default: the checkpoint's, else zeros)")
    de.add_argument("--export", default=None, metavar="FILE.onnx",
                    help="also write the dense net as ONNX (dynamic batch, height and width; the border "
                    "padding is inside the graph; needs `pip install onnx onnxruntime`)")
    de.add_argument("--seed", type=seed, default=0)
    de.add_argument("--device", default="auto")
    de.set_defaults(func=run_densify)


def _size(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or len(dims) > 2 or min(dims) < 1:
        raise ConfigError(f"--size {text!r}: expected HxW such as 64x64 (or L for 1D nets)")
    return dims


def run_densify(args) -> int:
    from cnnkit.dense import densify, patch_by_patch

    retain_freed_memory()  # full-resolution maps: reuse pages (see cnnkit.dense.allocator)
    seed_everything(args.seed)
    if args.export and Path(args.export).is_dir():  # before any work is shown
        raise OutputError(f"--export {args.export} is a folder; give the name of the .onnx file to write")
    device = resolve_device(args.device)
    size = _size(args.size)
    preprocess_args, border = {"normalize": "none", "contrast": "none"}, args.border or "zeros"
    if args.checkpoint:
        from cnnkit.segmentation.predict import Segmenter

        member = Segmenter(args.checkpoint, tta=False, device=device, allow_code=args.model).members[0]
        model, patch, name = member.dense.model, member.dense.patch, f"checkpoint {args.checkpoint}"
        preprocess_args, border = member.preprocess, args.border or member.dense.border
    else:
        model, patch = create_patch_net(args.net)
        model.to(device).eval()
        name = f"{args.net} net"
    patch = args.patch or patch
    dense = densify(model, patch, border=border, mode=args.mode)
    c = dense.in_channels
    if args.image:
        from cnnkit.segmentation.augment import preprocess
        from cnnkit.segmentation.data import load_image

        x = preprocess(load_image(Path(args.image), c), None, **preprocess_args)[None].to(device)
        size = tuple(x.shape[2:])
    else:
        x = torch.randn(1, c, *size, device=device)
    with torch.no_grad():
        y = dense(x)
    print(f"{name}: patch {'x'.join(map(str, dense.patch))}, {c} input channels, "
          f"{dense.num_classes} outputs per pixel")
    print(f"{'layer':<12} {'dense op':<34} {'dilation':<9} layout")
    for row in dense.layers():
        dil = "x".join(map(str, row["dilation"])) if "dilation" in row else ""
        print(f"{str(row['name']):<12} {row['op']:<34} {dil:<9} {row.get('layout', '')}")
    if args.export:
        from cnnkit.dense.export import export_onnx

        path = export_onnx(dense, args.export)
        print(f"wrote {path}: ONNX, input image (N, {c}, H, W) -> scores (N, {dense.num_classes}, H, W), "
              f"border {dense.border!r} inside, dilated layout")
    if not args.check:
        return 0
    n = min(args.pixels, int(np.prod(size)))
    flat = torch.randperm(int(np.prod(size)))[:n]
    pos = torch.stack(torch.unravel_index(flat, size), 1)
    with torch.no_grad():
        ref = patch_by_patch(model, x, patch, border=border, pixels=pos)  # (1, K, n)
    got = y[(slice(None), slice(None), *pos.to(device).unbind(1))]
    diff = (got - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    ok = diff <= 1e-4 * scale
    what = args.image or f"random {'x'.join(map(str, size))} image"
    print(f"checked {n} random pixels of {what} against patch-by-patch: "
          f"max abs difference {diff:.3g} ({'OK' if ok else 'MISMATCH'}, tolerance {1e-4 * scale:.3g})")
    return 0 if ok else 1
