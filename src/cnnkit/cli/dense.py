"""``cnnkit segment train|predict`` and ``cnnkit densify``: pixelwise classification from the shell."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from cnnkit.dense.allocator import retain_freed_memory
from cnnkit.errors import ConfigError, DataError
from cnnkit.utils import atomic_path, ensure_writable_dir, resolve_device, seed_everything, write_json_atomic

PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)]


def register(sub: argparse._SubParsersAction) -> None:
    seg = sub.add_parser("segment", help="train a patch classifier for pixelwise labels, or label images",
                         description="Pixelwise classification with a patch classifier run densely "
                         "(Li, Zhao, Wang arXiv:1412.4526): exact, one pass per image.")
    segsub = seg.add_subparsers(dest="segment_command", metavar="ACTION", parser_class=type(seg))
    seg.set_defaults(func=lambda a: seg.print_help() or 2)

    tr = segsub.add_parser("train", help="train on image/mask folders or on generated data")
    tr.add_argument("--data", default="generated", help="folder with images/ and masks/, or 'generated'")
    tr.add_argument("--images", default="images", help="image subfolder of --data (default: images)")
    tr.add_argument("--masks", default="masks", help="mask subfolder of --data (default: masks)")
    tr.add_argument("--valid", default=None, help="subfolder of valid-region masks (e.g. DRIVE's mask)")
    _mask_args(tr)
    tr.add_argument("--resize-to-mask", action="store_true", help="resize images to their mask's size")
    tr.add_argument("--net", default="segment", help="patch net: segment (default), toy, membrane")
    tr.add_argument("--width", type=int, default=16, help="segment net width (default 16)")
    tr.add_argument("--patch", type=int, default=28, help="patch size in pixels (segment net; default 28)")
    tr.add_argument("--mode", choices=("dense", "patches"), default="dense",
                    help="dense: whole-image loss in one pass; patches: sampled patches (default dense)")
    tr.add_argument("--epochs", type=int, default=20)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    tr.add_argument("--pixels-per-image", type=int, default=0,
                    help="dense: train on this many class-balanced pixels per image and step (0 = all)")
    tr.add_argument("--images-per-step", type=int, default=1, help="dense: same-size images per step")
    tr.add_argument("--batch-size", type=int, default=128, help="patches: patches per step")
    tr.add_argument("--steps-per-epoch", type=int, default=0, help="patches: steps per epoch (0 = images)")
    tr.add_argument("--border", choices=("zeros", "reflect", "replicate"), default="reflect")
    tr.add_argument("--generated-count", type=int, default=32, help="number of generated images")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--out", default="runs/segment.safetensors", help="checkpoint file to write")
    tr.set_defaults(func=run_train)

    pr = segsub.add_parser("predict", help="label images: label PNGs, probability maps, overlays")
    pr.add_argument("checkpoint")
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--masks", default=None, help="folder of true masks: print scores")
    pr.add_argument("--valid", default=None, help="folder of valid-region masks (scores inside only)")
    _mask_args(pr)
    pr.add_argument("--max-memory", type=float, default=None, help="tile images to stay near this many MB")
    pr.add_argument("--device", default="auto")
    pr.set_defaults(func=run_predict)

    de = sub.add_parser("densify", help="convert a patch net to a dense one and check it",
                        description="Print the dense version of a patch net (layers, dilations, chosen "
                        "layout) and, with --check, compare it with patch-by-patch on random pixels.")
    de.add_argument("--net", default="toy", help="toy, descriptor, membrane or segment (default toy)")
    de.add_argument("--checkpoint", default=None, help="a `cnnkit segment train` checkpoint instead of --net")
    de.add_argument("--patch", type=int, default=None, help="patch size (default: the net's own)")
    de.add_argument("--check", action="store_true", help="verify random pixels against patch-by-patch")
    de.add_argument("--size", default="64x64", help="test image HxW (default 64x64)")
    de.add_argument("--pixels", type=int, default=200, help="pixels to verify (default 200)")
    de.add_argument("--mode", choices=("auto", "dilated", "space_to_batch"), default="auto")
    de.add_argument("--border", choices=("zeros", "reflect", "replicate"), default="zeros")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--device", default="auto")
    de.set_defaults(func=run_densify)


def _mask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mask-mode", choices=("auto", "index", "binary", "palette"), default="auto")
    p.add_argument("--palette", default=None, help="colour masks: 'r,g,b;r,g,b;...' (colour i = class i)")
    p.add_argument("--ignore-value", type=int, default=None, help="mask value meaning unlabelled")


def _palette(text: str | None):
    if text is None:
        return None
    try:
        cols = [tuple(int(v) for v in c.split(",")) for c in text.split(";") if c.strip()]
    except ValueError:
        cols = []
    if not cols or any(len(c) != 3 for c in cols):
        raise ConfigError(f"--palette {text!r}: expected 'r,g,b;r,g,b;...'")
    return cols


def _normalise(samples, mean, std):
    for s in samples:
        s.image = (s.image - mean[:, None, None]) / std[:, None, None]


def run_train(args) -> int:
    from cnnkit.data import segmentation as seg
    from cnnkit.dense import nets
    from cnnkit.dense.checkpoint import save_segmenter
    from cnnkit.dense.train import TrainConfig, train_patch_classifier

    retain_freed_memory()  # full-resolution maps: reuse pages (see cnnkit.dense.allocator)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    if args.data == "generated":
        samples = seg.generate_textured_shapes(args.generated_count, seed=args.seed)
    else:
        samples = seg.load_folder(Path(args.data), args.images, args.masks, args.valid,
                                  mask_mode=args.mask_mode, palette=_palette(args.palette),
                                  ignore_value=args.ignore_value, resize_to_mask=args.resize_to_mask)
    channels = {s.image.shape[0] for s in samples}
    if len(channels) != 1:
        raise DataError(f"training images mix {sorted(channels)} channels; convert them to one")
    in_channels = channels.pop()
    num_classes = seg.num_classes_of(samples)
    net_args = {"in_channels": in_channels, "num_classes": num_classes}
    if args.net == "segment":
        net_args.update(width=args.width, patch=args.patch)
    model, patch = nets.build(args.net, **net_args)
    model.to(device)
    pixels = torch.cat([s.image.reshape(in_channels, -1) for s in samples], dim=1)
    mean, std = pixels.mean(1), pixels.std(1).clamp_min(1e-3)
    _normalise(samples, mean, std)
    ensure_writable_dir(Path(args.out).parent)
    cfg = TrainConfig(mode=args.mode, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                      pixels_per_image=args.pixels_per_image, images_per_step=args.images_per_step,
                      batch_size=args.batch_size,
                      steps_per_epoch=args.steps_per_epoch, border=args.border, seed=args.seed)
    print(f"training {args.net} net ({sum(p.numel() for p in model.parameters())} parameters, "
          f"patch {patch}) on {len(samples)} images, {num_classes} classes, mode {args.mode}")
    history = train_patch_classifier(model, patch, samples, cfg, progress=True)
    metrics = _evaluate(model, patch, samples, num_classes, args.border, device)
    print(f"final loss {history[-1]['loss']:.4f}; on the training images: {_fmt(metrics)}")
    meta = {"net": args.net, "net_args": net_args, "patch": patch, "border": args.border,
            "mean": mean.tolist(), "std": std.tolist(), "num_classes": num_classes,
            "palette": _palette(args.palette) or PALETTE[:num_classes], "train_metrics": metrics,
            "train": {k: v for k, v in vars(args).items() if k != "func"}}
    save_segmenter(args.out, model.cpu(), meta)
    print(f"wrote {args.out}")
    return 0


def _evaluate(model, patch, samples, num_classes, border, device) -> dict:
    from cnnkit.analysis.segmentation_metrics import SegmentationMeter
    from cnnkit.dense import densify

    meter = SegmentationMeter(num_classes)
    dense = densify(model.eval(), patch, border=border)
    with torch.no_grad():
        for s in samples:
            probs = torch.softmax(dense(s.image[None].to(device)), 1)
            meter.update(probs.cpu(), s.target[None])
    return meter.compute()


def _fmt(m: dict) -> str:
    keys = [k for k in ("pixel_accuracy", "mean_iou", "f1", "roc_auc") if k in m]
    return ", ".join(f"{k} {m[k]:.4f}" for k in keys)


def _image_files(items: list[str]) -> list[Path]:
    from cnnkit.data.segmentation import IMAGE_SUFFIXES

    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p} is neither an image file nor a folder")
    if not files:
        raise DataError(f"no images found in {', '.join(items)}")
    return files


def run_predict(args) -> int:
    from cnnkit.analysis.segmentation_metrics import SegmentationMeter
    from cnnkit.data import segmentation as seg
    from cnnkit.dense import densify
    from cnnkit.dense.checkpoint import load_segmenter

    retain_freed_memory()  # full-resolution maps: reuse pages (see cnnkit.dense.allocator)
    device = resolve_device(args.device)
    model, meta = load_segmenter(args.checkpoint, device)
    files = _image_files(args.images)
    out = ensure_writable_dir(args.out)
    c, k = meta["net_args"]["in_channels"], meta["num_classes"]
    mean = torch.tensor(meta["mean"], device=device)
    std = torch.tensor(meta["std"], device=device)
    masks = seg.pair_files(files, seg._files(Path(args.masks)), "mask") if args.masks else None
    valid = seg.pair_files(files, seg._files(Path(args.valid)), "valid-region mask") if args.valid else None
    max_memory = int(args.max_memory * 2**20) if args.max_memory else None
    dense = densify(model, meta["patch"], border=meta["border"], max_memory=max_memory)
    meter = SegmentationMeter(k)
    palette = np.array([tuple(p) for p in meta["palette"]] + PALETTE[len(meta["palette"]):], dtype=np.float32)
    for i, f in enumerate(tqdm(files, desc="predict", unit="image", disable=not sys.stderr.isatty())):
        image = seg.load_image(f)
        if image.shape[0] != c:
            raise DataError(f"image {f.name} has {image.shape[0]} channels but the model takes {c}; "
                            "convert it first")
        with torch.no_grad():
            x = ((image.to(device) - mean[:, None, None]) / std[:, None, None])[None]
            probs = torch.softmax(dense(x), 1)[0].cpu()  # (K, H, W)
        labels = probs.argmax(0)
        _write_outputs(out, f.stem, image, probs, labels, palette)
        if masks is not None:
            target = seg.decode_mask(masks[i], args.mask_mode, _palette(args.palette), args.ignore_value)
            if target.shape != labels.shape:
                raise DataError(f"mask {masks[i].name} is {tuple(target.shape)} but image {f.name} is "
                                f"{tuple(labels.shape)}")
            if valid is not None:
                region = seg.decode_mask(valid[i], "binary")
                if region.shape != target.shape:
                    raise DataError(f"valid-region mask {valid[i].name} is not the size of {f.name}")
                target[region == 0] = seg.IGNORE_INDEX
            meter.update(probs[None], target[None])
    print(f"wrote labels, probabilities and overlays for {len(files)} images to {out}")
    if masks is not None:
        metrics = meter.compute()
        write_json_atomic(out / "metrics.json", metrics)
        print(f"scores: {_fmt(metrics)}")
    return 0


def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _write_outputs(out: Path, stem: str, image, probs, labels, palette) -> None:
    """<stem>_labels.png (class index), <stem>_prob.png (16-bit P(class 1); one file per class
    when K > 2), <stem>_overlay.png (image with class colours blended in)."""
    lab = labels.numpy().astype(np.uint8)
    _save_png(out / f"{stem}_labels.png", lab)
    p16 = (probs.clamp(0, 1).numpy() * 65535 + 0.5).astype(np.uint16)
    if probs.shape[0] == 2:
        _save_png(out / f"{stem}_prob.png", p16[1])
    else:
        for cls in range(probs.shape[0]):
            _save_png(out / f"{stem}_prob_{cls}.png", p16[cls])
    rgb = image.numpy()
    rgb = np.repeat(rgb, 3, 0) if rgb.shape[0] == 1 else rgb[:3]
    rgb = rgb.transpose(1, 2, 0) * 255
    colour = palette[lab % len(palette)]
    blend = np.where((lab > 0)[..., None], 0.5 * rgb + 0.5 * colour, rgb)
    _save_png(out / f"{stem}_overlay.png", blend.clip(0, 255).astype(np.uint8))


def _size(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or len(dims) > 2 or min(dims) < 1:
        raise ConfigError(f"--size {text!r}: expected HxW such as 64x64 (or L for 1D nets)")
    return dims


def run_densify(args) -> int:
    from cnnkit.dense import densify, nets, patch_by_patch
    from cnnkit.dense.checkpoint import load_segmenter

    retain_freed_memory()  # full-resolution maps: reuse pages (see cnnkit.dense.allocator)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    if args.checkpoint:
        model, meta = load_segmenter(args.checkpoint, device)
        patch, name = meta["patch"], f"checkpoint {args.checkpoint}"
    else:
        model, patch = nets.build(args.net)
        model.to(device).eval()
        name = f"{args.net} net"
    size = _size(args.size)
    patch = args.patch or patch
    dense = densify(model, patch, border=args.border, mode=args.mode)
    c = dense.in_channels
    x = torch.randn(1, c, *size, device=device)
    with torch.no_grad():
        y = dense(x)
    print(f"{name}: patch {patch}, {c} input channels, {dense.num_classes} outputs per pixel")
    print(f"{'layer':<12} {'dense op':<34} {'dilation':<9} layout")
    for row in dense.layers():
        dil = "x".join(map(str, row["dilation"])) if "dilation" in row else ""
        print(f"{str(row['name']):<12} {row['op']:<34} {dil:<9} {row.get('layout', '')}")
    if not args.check:
        return 0
    n = min(args.pixels, int(np.prod(size)))
    flat = torch.randperm(int(np.prod(size)))[:n]
    pos = torch.stack(torch.unravel_index(flat, size), 1)
    with torch.no_grad():
        ref = patch_by_patch(model, x, patch, border=args.border, pixels=pos)  # (1, K, n)
    got = y[(slice(None), slice(None), *pos.to(device).unbind(1))]
    diff = (got - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    ok = diff <= 1e-4 * scale
    print(f"checked {n} random pixels of a {args.size} image against patch-by-patch: "
          f"max abs difference {diff:.3g} ({'OK' if ok else 'MISMATCH'}, tolerance {1e-4 * scale:.3g})")
    return 0 if ok else 1
