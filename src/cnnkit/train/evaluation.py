"""Evaluate a checkpoint (or an average of several) on data, and classify image files with it.

The held-out images are loaded at the size the checkpoint's run loaded them (``load_size``) and
evaluated with a test protocol of ``cnnkit.train.tta``: the central crop (default), 10 crops, or VGG's
multi-scale dense evaluation; ``average`` adds more checkpoints whose posteriors are averaged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader

from cnnkit.data import IMAGE_EXTENSIONS, load_dataset, load_image
from cnnkit.errors import CheckpointError, DataError
from cnnkit.train.checkpoint import Checkpoint, load_checkpoint
from cnnkit.train.metrics import topk_error
from cnnkit.train.plots import plot_confusion
from cnnkit.train.tta import Predictor, check_protocol, evaluate_predictors
from cnnkit.utils import ensure_writable_dir, resolve_device, write_json_atomic


def _sizes(ckpt: Checkpoint) -> tuple[tuple[int, int], tuple[int, int]]:
    """(input size, load size) the checkpoint's run used."""
    size = tuple(ckpt.require("input_size"))
    return size, tuple(ckpt.meta.get("load_size") or size)


def predictor_for(ckpt: Checkpoint, device: torch.device, *, tta: str = "center", scales=(),
                  flip: bool = True) -> Predictor:
    model = ckpt.build_model().to(device)
    mean = ckpt.mean_image.to(device) if ckpt.mean_image is not None else None
    return Predictor(model, mean, _sizes(ckpt)[0], mode=tta, scales=scales, flip=flip)


def evaluate_checkpoint(path, *, data: str | None = None, split: str = "val", device: str = "auto",
                        batch_size: int = 256, out: Path | None = None, skip_bad_files: bool = False,
                        progress: bool | None = None, tta: str = "center", scales=(), flip: bool = True,
                        average=(), load_size: tuple[int, int] | None = None) -> dict:
    """Top-1/top-5 accuracy and error, and loss, of checkpoint ``path`` (averaged with the checkpoints in
    ``average``) on a split of its data (or of ``data``) under the test protocol ``tta``."""
    ckpt = _classification_checkpoint(path, "cnnkit segment eval")
    others = [_classification_checkpoint(p, "cnnkit segment eval") for p in average]
    for other in others:
        if list(other.classes) != list(ckpt.classes):
            raise DataError(f"{other.meta['path']} has classes {other.classes[:6]}... but {path} has "
                            f"{ckpt.classes[:6]}...; average checkpoints trained on the same classes")
    config = ckpt.meta.get("config", {})
    source = data or config.get("data", "digits")
    size, load = _sizes(ckpt)
    load = tuple(load_size) if load_size else load
    check_protocol(tta, scales, size, load)
    if out is not None:  # after the checkpoints' checks (a refused one leaves no folder), before the work
        ensure_writable_dir(out)
    splits = load_dataset(source, load, channels=ckpt.meta.get("channels"),
                          val_fraction=config.get("val_fraction", 0.2), seed=config.get("seed", 0),
                          skip_bad_files=skip_bad_files)
    if list(splits.classes) != list(ckpt.classes):
        raise DataError(f"{source} has classes {splits.classes[:6]}... but {path} was trained on "
                        f"{ckpt.classes[:6]}...; evaluate on data with the same classes")
    dataset = {"val": splits.val, "train": splits.train}.get(split) or ConcatDataset([splits.train, splits.val])
    dev = resolve_device(device)
    predictors = [predictor_for(c, dev, tta=tta, scales=scales, flip=flip) for c in [ckpt, *others]]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    metrics, confusion = evaluate_predictors(predictors, loader, len(ckpt.classes))
    result = {"checkpoint": str(path), "averaged_with": [str(p) for p in average], "data": source,
              "split": split, "images": len(dataset), "protocol": tta, "load_size": list(load),
              **({"scales": [int(q) for q in scales]} if tta == "multiscale" else {}),
              **metrics, **topk_error(metrics)}
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


def _classification_checkpoint(path, instead: str):
    """A classification checkpoint; a segmentation one is refused with the command that takes it."""
    ckpt = load_checkpoint(path)
    task = ckpt.meta.get("task", "classify")
    if task != "classify":
        raise CheckpointError(f"{path} is a {task!r} checkpoint (pixelwise labels); use `{instead} {path}`")
    return ckpt


def predict_files(path, images: list[Path], *, topk: int = 3, device: str = "auto") -> list[dict]:
    """Top-k classes with probabilities for each image file."""
    ckpt = _classification_checkpoint(path, "cnnkit segment predict")
    files = expand_image_paths(images)
    load = _sizes(ckpt)[1]  # loaded as in training, then the central crop
    x = torch.stack([load_image(f, channels=ckpt.require("channels"), size=load) for f in files])  # (N, C, H, W)
    predictor = predictor_for(ckpt, resolve_device(device))
    proba = torch.cat([predictor(chunk).cpu() for chunk in x.split(256)])
    k = min(topk, proba.shape[1])
    values, indices = proba.topk(k, dim=1)
    return [{"file": str(f), "classes": [ckpt.classes[i] for i in idx.tolist()],
             "probabilities": [round(v, 6) for v in val.tolist()]}
            for f, idx, val in zip(files, indices, values)]
