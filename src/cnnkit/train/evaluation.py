"""Evaluate a checkpoint on data, and classify image files with it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader

from cnnkit.data import IMAGE_EXTENSIONS, load_dataset, load_image
from cnnkit.errors import DataError
from cnnkit.train.checkpoint import load_checkpoint
from cnnkit.train.engine import evaluate, predict_proba
from cnnkit.train.plots import plot_confusion
from cnnkit.utils import ensure_writable_dir, resolve_device, write_json_atomic


def evaluate_checkpoint(path, *, data: str | None = None, split: str = "val", device: str = "auto",
                        batch_size: int = 256, out: Path | None = None, skip_bad_files: bool = False,
                        progress: bool | None = None) -> dict:
    """Top-1/top-5 accuracy and loss of checkpoint ``path`` on a split of its data (or of ``data``)."""
    if out is not None:
        ensure_writable_dir(out)
    ckpt = load_checkpoint(path)
    config = ckpt.meta.get("config", {})
    source = data or config.get("data", "digits")
    size = tuple(ckpt.meta["input_size"])
    splits = load_dataset(source, size, channels=ckpt.meta.get("channels"),
                          val_fraction=config.get("val_fraction", 0.2), seed=config.get("seed", 0),
                          skip_bad_files=skip_bad_files)
    if list(splits.classes) != list(ckpt.classes):
        raise DataError(f"{source} has classes {splits.classes[:6]}... but {path} was trained on "
                        f"{ckpt.classes[:6]}...; evaluate on data with the same classes")
    dataset = {"val": splits.val, "train": splits.train}.get(split) or ConcatDataset([splits.train, splits.val])
    dev = resolve_device(device)
    model = ckpt.build_model().to(dev)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    metrics, confusion = evaluate(model, loader, device=dev, num_classes=len(ckpt.classes),
                                  mean=ckpt.mean_image.to(dev), progress=progress, desc=f"evaluate {split}")
    result = {"checkpoint": str(path), "data": source, "split": split, "images": len(dataset), **metrics}
    if out is not None:
        png = Path(out) / "confusion.png"
        plot_confusion(confusion, ckpt.classes, png, title=f"{ckpt.model_name}: top-1 {metrics['acc1']:.4f}")
        result["confusion_png"] = str(png)
        write_json_atomic(Path(out) / "eval.json", result)
    return result


def expand_image_paths(paths: list[Path]) -> list[Path]:
    """Files as given; folders contribute their image files (sorted, recursively)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not found:
                raise DataError(f"folder {p} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"image {p} does not exist; pass image files or folders of images")
    return files


def predict_files(path, images: list[Path], *, topk: int = 3, device: str = "auto") -> list[dict]:
    """Top-k classes with probabilities for each image file."""
    ckpt = load_checkpoint(path)
    files = expand_image_paths(images)
    size = tuple(ckpt.meta["input_size"])
    x = torch.stack([load_image(f, channels=ckpt.meta["channels"], size=size) for f in files])  # (N, C, H, W)
    dev = resolve_device(device)
    model = ckpt.build_model().to(dev)
    proba = predict_proba(model, x, mean=ckpt.mean_image.to(dev))
    k = min(topk, proba.shape[1])
    values, indices = proba.topk(k, dim=1)
    return [{"file": str(f), "classes": [ckpt.classes[i] for i in idx.tolist()],
             "probabilities": [round(v, 6) for v in val.tolist()]}
            for f, idx, val in zip(files, indices, values)]
