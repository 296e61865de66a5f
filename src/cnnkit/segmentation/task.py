"""Pixelwise classification as a task of the one runner: ``cnnkit segment train``.

A patch classifier (any patch net of the registry, or a user's ``package.module:function``) is
trained densely (Li, Zhao, Wang arXiv:1412.4526): the loss over every labelled pixel of a crop is
computed in one forward and backward pass of the dense net, and its gradient is exactly the sum of
the per-patch gradients. The run folder, checkpoints, ``--resume``, the optimiser, the schedule,
mixed precision and ``torchrun`` are the runner's (``cnnkit.train.runner``).

A training item is a crop of ``crop x crop`` output pixels. Its input is the window that holds their
patches: ``crop + P - 1`` pixels a side, cut from the image padded once by the border rule of
``cnnkit.dense.tiling``, so that every output equals the patch net on that pixel's patch of the
whole (padded) image. Augmentations (``cnnkit.segmentation.augment``: the 8 flips/rotations,
elastic deformation, intensity) are drawn per item from (seed, epoch, item) and applied to a window
with a symmetric margin, identically to image, mask and valid region. The loss is the cross-entropy
over the labelled pixels, optionally class-balanced (inverse class frequency of the training masks)
and restricted to the hardest fraction of pixels (bootstrapping); each crop's mean counts equally.

Held-out images (``--val-data`` folders, or a seeded ``--val-fraction`` of the images) are scored
after every epoch with one dense pass each; best.safetensors is the epoch with the best ROC AUC (two
classes) or mean IoU. After training, for two classes, the probability threshold that maximises the
positive class's F1 on the held-out images (averaged over the 8 flips/rotations when ``tta``) is
stored in best.safetensors and used by ``cnnkit segment predict``.

Volumes (``--volume``, :mod:`cnnkit.segmentation.volume`): in 3D a training item is a block of
``crop`` voxels a side with the P x P x P patches its voxels read, augmented in the slice plane only
(flips and quarter turns of H and W; depth is never flipped, as slices are often thicker than pixels
are wide); in 2.5D every slice with its neighbours as channels is a 2D image of the pipeline above.

Dropout and BatchNorm act as in eval mode in the dense net (per-patch dropout masks and batch
statistics have no dense equivalent).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cnnkit.dense import densify
from cnnkit.dense.ops import LAYOUTS
from cnnkit.dense.tiling import BORDERS, patch_span
from cnnkit.errors import ConfigError, DataError
from cnnkit.models import create_patch_net
from cnnkit.segmentation.augment import CONTRAST_MODES, DEFAULT_AUGMENT, NORMALIZE_MODES, JointAugment, preprocess
from cnnkit.segmentation.data import (
    IGNORE_INDEX,
    MASK_MODES,
    SegmentationSample,
    check_classes,
    generate_textured_shapes,
    load_folder,
    num_classes_of,
    split_samples,
)
from cnnkit.segmentation.metrics import SegmentationMeter
from cnnkit.segmentation.volume import VolumeMode, load_volume_folder, slice_samples
from cnnkit.train.classification import make_loader
from cnnkit.train.config import TrainConfig
from cnnkit.train.engine import autocast, bar, optimizer_step
from cnnkit.train.task import Task

log = logging.getLogger(__name__)

CLASS_WEIGHTS = ("balanced", "none")
SELECT = ("auto", "roc_auc", "mean_iou", "f1", "pixel_accuracy")
CROP_STREAM = 3 << 20


@dataclass
class SegmentConfig(TrainConfig):
    """A ``cnnkit segment train`` run: the runner's settings with segmentation's defaults and fields."""

    data: str = "generated"
    model: str = "segment"
    out: str = "runs/segment"
    epochs: int = 20
    batch_size: int = 8  # crops per global batch
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    val_fraction: float = 0.2
    augment: str = DEFAULT_AUGMENT
    mean: str = "image"  # unused: segmentation standardises each image (normalize)
    # --- data
    images: str = "images"  # subfolders of data (and val_data)
    masks: str = "masks"
    valid: str | None = None  # subfolder of valid-region masks (DRIVE's field of view)
    val_data: str | None = None  # held-out folder with the same subfolders; else val_fraction of data
    mask_mode: str = "auto"
    palette: list = field(default_factory=list)  # [[r, g, b], ...]: colour i is class i
    ignore_value: int | None = None
    num_classes: int | None = None  # default: the largest mask value + 1 (at least 2)
    mask_suffix: str | None = None
    image_suffix: str | None = None
    skip_unpaired: bool = False
    resize_to_mask: bool = False
    scale: float | None = None  # resize images and masks by this factor when loading
    volume: str = "none"  # "3d", "2.5d" or "2.5d=K": images are volumes (see cnnkit.segmentation.volume)
    generated_count: int = 32  # images of the generated default
    # --- training items and loss
    border: str = "reflect"
    crop: int = 64  # output pixels per side of a training crop
    crops_per_image: int = 0  # crops drawn from every training image per epoch; 0 = its area in crops
    normalize: str = "image"
    contrast: str = "none"
    class_weight: str = "balanced"
    hard_fraction: float = 1.0  # train on this fraction of the hardest labelled pixels of each crop
    # --- selection and prediction
    positive_class: int = 1
    select: str = "auto"
    threshold_tta: bool = True  # pick the held-out threshold on the mean of the 8 flips/rotations
    max_memory_mb: float | None = None  # bound on each held-out dense pass's peak memory (None: the default)
    dense_mode: str = "auto"  # layouts of the dense layers: measured per machine, or "dilated"/"space_to_batch"

    def validate(self) -> None:
        super().validate()
        checks = [
            (self.crop >= 1, f"--crop must be at least 1, got {self.crop}"),
            (self.crops_per_image >= 0, f"--crops-per-image must be >= 0 (0 = auto), got {self.crops_per_image}"),
            (self.border in BORDERS, f"--border must be one of {', '.join(BORDERS)}, got {self.border!r}"),
            (self.normalize in NORMALIZE_MODES, f"--normalize must be one of {', '.join(NORMALIZE_MODES)}"),
            (self.contrast in CONTRAST_MODES, f"--contrast must be one of {', '.join(CONTRAST_MODES)}"),
            (self.class_weight in CLASS_WEIGHTS, f"--class-weight must be one of {', '.join(CLASS_WEIGHTS)}"),
            (0 < self.hard_fraction <= 1, f"--hard-fraction must be in (0, 1], got {self.hard_fraction}"),
            (self.select in SELECT, f"--select must be one of {', '.join(SELECT)}, got {self.select!r}"),
            (self.mask_mode in MASK_MODES, f"--mask-mode must be one of {', '.join(MASK_MODES)}"),
            (all(_is_colour(c) for c in self.palette),
             f"--palette must be colours [[r, g, b], ...] with values 0..255, got {self.palette}"),
            (self.scale is None or (math.isfinite(self.scale) and self.scale > 0),
             f"--scale must be a positive number, got {self.scale}"),
            (self.num_classes is None or self.num_classes >= 2,
             f"--classes must be at least 2, got {self.num_classes}"),
            (self.positive_class >= 0, f"--positive-class must be >= 0, got {self.positive_class}"),
            (self.generated_count >= 2, f"--generated-count must be at least 2, got {self.generated_count}"),
            (self.max_memory_mb is None or self.max_memory_mb > 0, "--max-memory must be positive"),
            (self.dense_mode in LAYOUTS, f"--dense-mode must be one of {', '.join(LAYOUTS)}, got {self.dense_mode!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.num_classes is not None and self.positive_class >= self.num_classes:
            raise ConfigError(f"--positive-class {self.positive_class} is not one of the {self.num_classes} classes")
        augment = JointAugment.from_spec(self.augment)  # unknown names -> one line, before anything starts
        self._check_volume(augment)

    def _check_volume(self, augment: JointAugment) -> None:
        volume = VolumeMode.parse(self.volume)
        self.volume = volume.spec() if volume is not None else "none"  # one spelling per mode ("2.5d" -> "2.5d=1")
        if volume is None:
            return
        refused = [(self.data == "generated", "--data generated (give a folder of volumes)"),
                   (self.valid is not None, "--valid"), (self.scale is not None, "--scale"),
                   (self.resize_to_mask, "--resize-to-mask")]
        if volume.mode == "3d":
            refused.append((augment.elastic is not None, "elastic augmentation (a 2D deformation)"))
            if self.model == "segment":  # the default 2D net: its 3D twin (a 2D net cannot read a volume)
                self.model = "segment3d"
        for bad, what in refused:
            if bad:
                raise ConfigError(f"--volume {self.volume} does not take {what}; drop it, or leave out --volume")
        if ":" not in self.model:  # a registered net: its patch is known before any data is read
            from cnnkit.models import model_info

            check_patch_dims(self.model, model_info(self.model).input_size[1:], volume)

    def check_model(self) -> None:
        if ":" not in self.model:  # a user's module:function is imported when the model is built
            super().check_model()


def check_patch_dims(model: str, patch, volume: VolumeMode | None) -> None:
    """A 3D patch for ``--volume 3d``, a 2D one otherwise, or one line naming the net and the fix."""
    dims = 3 if volume is not None and volume.mode == "3d" else 2
    if len(patch) != dims:
        mode = f"--volume {volume.spec()}" if volume is not None else "training on 2D images"
        fix = "a 3D patch net (e.g. --model segment3d)" if dims == 3 else "a 2D patch net, or --volume 3d"
        raise ConfigError(f"patch net {model!r} reads {'x'.join(map(str, patch))} patches but {mode} takes "
                          f"{dims}D ones; use {fix}")


def _is_colour(c) -> bool:
    return (isinstance(c, (list, tuple)) and len(c) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c))


# --------------------------------------------------------------------------- training items


class CropDataset(Dataset):
    """Item i of epoch e: a random crop of image i mod n, augmented, drawn from (seed, epoch, i).

    ``crops_per_image`` 0 draws from every image as many crops as cover its area once (at least one), so
    that an epoch means the same amount of training for small and large images.

    Returns (window (C, crop + P - 1, crop + P - 1), target (crop, crop)). The window is cut with a
    symmetric margin of max(before, after) pixels around the crop, augmented (the dihedral maps and
    the elastic field keep the crop's centre), standardised with its image's ``affine`` (mean, std)
    when given, then trimmed to the patches the crop's pixels read. Volumes (C, D, H, W) give blocks:
    (C, crop + P - 1 per axis), target (crop, crop, crop), augmented in the (H, W) plane.
    """

    def __init__(self, samples: list[SegmentationSample], crop: int, patch: tuple[int, ...], border: str,
                 augment: JointAugment, crops_per_image: int, seed: int, affine: list | None = None):
        self.samples, self.augment, self.seed = samples, augment, seed
        self.affine = affine or [None] * len(samples)
        self.crop = min([crop] + [min(s.target.shape) for s in samples])
        self.dims = len(patch)
        area = sum(s.target.numel() for s in samples) / len(samples)
        self.per_image = crops_per_image or max(1, round(area / self.crop**self.dims))
        self.before = [patch_span(p)[0] for p in patch]
        self.margin = max(max(patch_span(p)) for p in patch)  # one margin on every axis: turns keep it
        self.window = [self.crop + p - 1 for p in patch]
        self.epoch = 0
        m = self.margin
        self.padded, self.labelled = [], []
        for s in samples:
            self.labelled.append((s.target.flatten() != IGNORE_INDEX).nonzero().squeeze(1).int())
            image = _pad(s.image[None], m, border)[0]
            target = F.pad(s.target, (m, m) * self.dims, value=IGNORE_INDEX)
            valid = s.valid if s.valid is not None else torch.ones(s.target.shape, dtype=torch.bool)
            self.padded.append((image, target, F.pad(valid, (m, m) * self.dims, value=False)))

    def __len__(self) -> int:
        return len(self.samples) * self.per_image

    def position(self, k: int, g: torch.Generator) -> tuple[int, ...]:
        """Top-left corner of a crop of image k: centred on a labelled pixel drawn uniformly (so no step is
        spent on unlabelled margins such as the black corners of a fundus image), kept inside the image."""
        shape = self.samples[k].target.shape
        labelled = self.labelled[k]
        flat = int(labelled[torch.randint(len(labelled), (1,), generator=g)]) if len(labelled) else 0
        c = self.crop
        centre = [int(i) for i in np.unravel_index(flat, tuple(shape))]
        return tuple(min(max(i - c // 2, 0), n - c) for i, n in zip(centre, shape))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(epoch_seed_item(self.seed, self.epoch, i))
        image, target, valid = self.padded[i % len(self.samples)]
        affine = self.affine[i % len(self.samples)]
        c, m = self.crop, self.margin
        corner = self.position(i % len(self.samples), g)
        box = tuple(slice(a, a + c + 2 * m) for a in corner)
        x, y, v = image[(slice(None), *box)], target[box], valid[box]
        x, y, v = self.augment(x, y, v, g)
        if affine is not None:
            x = (x - affine[0]) / affine[1]
        y = torch.where(v, y, IGNORE_INDEX)
        x = x[(slice(None), *(slice(m - b, m - b + w) for b, w in zip(self.before, self.window)))]
        return x.contiguous(), y[(slice(m, m + c),) * self.dims].contiguous()


def standardization(image: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (C, 1, 1) ((C, 1, 1, 1) for a volume), of the pixels inside ``valid``:
    preprocess's normalize="image"."""
    pixels = image.flatten(1) if valid is None else image[:, valid]  # (C, N)
    ones = (1,) * (image.dim() - 1)
    return pixels.mean(1).view(-1, *ones), pixels.std(1, correction=0).clamp_min(1e-6).view(-1, *ones)


def epoch_seed_item(seed: int, epoch: int, item: int) -> int:
    return (epoch_seed_from(seed, epoch) * 1_000_033 + item) % 2**62


def epoch_seed_from(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + CROP_STREAM * 104_729) % 2**62


def _pad(x: torch.Tensor, m: int, border: str) -> torch.Tensor:
    """Pad the spatial axes of (1, C, *L) by ``m`` on each side."""
    if m == 0:
        return x
    if border == "reflect" and m >= min(x.shape[2:]):
        raise ConfigError(f"border 'reflect' needs images larger than {m} pixels a side for this patch "
                          f"(got {'x'.join(map(str, x.shape[2:]))}); use --border replicate or zeros")
    return F.pad(x, (m, m) * (x.dim() - 2), mode=BORDERS[border])


class CropNet(nn.Module):
    """The dense net on a window that already holds every output pixel's patch (no padding):
    (N, C, c + P - 1, c + P - 1) -> (N, K, c, c), and likewise with a depth axis. Its parameters are
    the patch net's."""

    def __init__(self, dense):
        super().__init__()
        self.dense = dense

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        out = [n - p + 1 for n, p in zip(window.shape[2:], self.dense.patch)]
        return self.dense.core(window)[(..., *(slice(0, c) for c in out))]


def pixel_losses(scores: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                 hard_fraction: float = 1.0) -> torch.Tensor:
    """Per-crop loss (N,): the (class-weighted) mean cross-entropy over each crop's labelled pixels,
    or over its ``hard_fraction`` hardest ones; 0 for a crop without labelled pixels."""
    if scores.dtype in (torch.float16, torch.bfloat16):  # autocast: the loss in float32
        scores = scores.float()
    weight = weight.to(scores.dtype) if weight is not None else None
    per_pixel = F.cross_entropy(scores, target, weight=weight, ignore_index=IGNORE_INDEX,
                                reduction="none").flatten(1)  # (N, c*c), 0 where ignored
    labelled = (target != IGNORE_INDEX).flatten(1)
    w = weight[target.clamp_min(0)].flatten(1) * labelled if weight is not None else labelled.float()
    if hard_fraction < 1:
        keep = torch.zeros_like(labelled)
        for n in range(len(per_pixel)):
            k = math.ceil(hard_fraction * int(labelled[n].sum()))
            if k:
                keep[n, per_pixel[n].masked_fill(~labelled[n], -1).topk(k).indices] = True
        per_pixel, w = per_pixel * keep, w * keep
    return per_pixel.sum(1) / w.sum(1).clamp_min(1e-12)


# --------------------------------------------------------------------------- the task


class SegmentationTask(Task):
    name = "segment"
    command = "cnnkit segment train"

    def prepare(self, cfg: SegmentConfig, ctx) -> None:
        self.cfg = cfg
        self.volume = VolumeMode.parse(cfg.volume)
        train, val, source = _load(cfg)
        unit = "images"
        if self.volume is not None and self.volume.mode == "3d":
            unit = "volumes (3d)"
        elif self.volume is not None:  # split by volume, then every slice is a 2D image
            unit = f"slices of {len(train)} / {len(val)} volumes ({self.volume.spec()})"
            train, val = slice_samples(train, self.volume.context), slice_samples(val, self.volume.context)
        if self.volume is not None and JointAugment.from_spec(cfg.augment).intensity:
            for s in train:  # float TIFFs keep their stored values; the intensity jitter works in [0, 1]
                if s.image.min() < 0 or s.image.max() > 1:
                    raise DataError(f"volume {s.name} has values outside [0, 1] (a float or 32-bit TIFF); "
                                    "rescale it to [0, 1], or pass --augment without intensity")
        channels = {s.image.shape[0] for s in train + val}
        if len(channels) != 1:
            raise DataError(f"images in {source} mix {sorted(channels)} channels; convert them to one")
        self.channels = channels.pop()
        k = cfg.num_classes or (len(cfg.palette) if cfg.palette else num_classes_of(train + val))
        check_classes(train + val, k)
        if cfg.positive_class >= k:
            raise ConfigError(f"--positive-class {cfg.positive_class} is not one of the {k} classes")
        self.classes = [str(c) for c in range(k)]
        self.val_raw = [(s.image, s.valid) for s in val]  # for the final threshold, through predict's code
        for s in val:  # once per image, as at prediction time
            s.image = preprocess(s.image, s.valid, normalize=cfg.normalize, contrast=cfg.contrast)
        # training crops: contrast enhancement on the whole image, intensity jitter on the crop, then the
        # whole image's standardisation (so a crop without jitter is exactly what prediction sees)
        self.affine = []
        for s in train:
            s.image = preprocess(s.image, s.valid, normalize="none", contrast=cfg.contrast)
            self.affine.append(standardization(s.image, s.valid) if cfg.normalize == "image" else None)
        self.train, self.val = train, val
        self.weight = _class_weights(train, k) if cfg.class_weight == "balanced" else None
        self.key = cfg.select if cfg.select != "auto" else ("roc_auc" if k == 2 else "mean_iou")
        self.select_key = f"val_{self.key}"
        self.description = (f"{source}: {len(train)} training / {len(val)} held-out {unit}, {k} classes, "
                            f"{self.channels} channel(s)")
        log.info("data: %s", self.description)
        metrics = ["pixel_accuracy", "mean_iou"] + (["f1", "roc_auc"] if k == 2 else [])
        self.metric_columns = (["epoch", "lr", "train_loss", "train_pixel_accuracy", "val_loss"]
                               + [f"val_{m}" for m in metrics] + ["seconds"])
        self.curve = [(f"val_{m}", m.replace("_", " ")) for m in metrics]

    def build_model(self, cfg: SegmentConfig) -> nn.Module:
        options = {**cfg.model_options, "num_classes": len(self.classes), "in_chans": self.channels}
        model, self.patch = create_patch_net(cfg.model, **options)
        check_patch_dims(cfg.model, self.patch, self.volume)
        model.model_options = {k: v for k, v in options.items() if k in model.model_options or k in cfg.model_options
                               or k in ("num_classes", "in_chans")}
        self.dense = densify(model, self.patch, border=cfg.border, mode=cfg.dense_mode,
                             max_memory=int(cfg.max_memory_mb * 2**20) if cfg.max_memory_mb else None)
        self.items = CropDataset(self.train, cfg.crop, self.patch, cfg.border, JointAugment.from_spec(cfg.augment),
                                 cfg.crops_per_image, cfg.seed, self.affine)
        return model

    def train_module(self, model: nn.Module) -> nn.Module:
        return CropNet(self.dense)

    def train_epoch(self, net, model, optimizer, *, epoch, cfg, ctx, progress, scaler=None, averaged=None):
        self.items.epoch = epoch
        loader = make_loader(self.items, cfg, ctx, shuffle=True, epoch=epoch)
        weight = self.weight.to(ctx.device) if self.weight is not None else None
        total = correct = labelled = 0.0
        losses = []
        for step, (x, y) in enumerate(bar(loader, progress, f"epoch {epoch} train"), start=1):
            lo, hi, n_global = loader.batch_sampler.layout[step - 1]
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with autocast(ctx.device, cfg.precision):
                scores = net(x)
            loss = pixel_losses(scores, y, weight, cfg.hard_fraction).mean()
            losses.append(optimizer_step(loss, optimizer, epoch=epoch, batch=step, n_local=hi - lo,
                                         n_global=n_global, world_size=ctx.world_size, scaler=scaler))
            if averaged is not None:
                averaged.update_parameters(model)
            with torch.no_grad():
                mask = y != IGNORE_INDEX
                correct += float((scores.argmax(1) == y)[mask].sum())
                labelled += float(mask.sum())
        total = sum(losses) / max(1, len(losses))
        return {"loss": total, "pixel_accuracy": correct / max(1.0, labelled)}

    @torch.no_grad()
    def evaluate(self, model, *, epoch, cfg, ctx, progress):
        """One dense pass per held-out image (every process scores them all)."""
        model.eval()
        dense = (self.dense if model is self.dense.model
                 else densify(model, self.patch, border=cfg.border, mode=cfg.dense_mode))
        meter = SegmentationMeter(len(self.classes), positive=cfg.positive_class)
        loss_sum, pixels, examples = 0.0, 0, []
        for s in bar(self.val, progress, f"epoch {epoch} held-out"):
            with autocast(ctx.device, cfg.precision):
                scores = dense(s.image[None].to(ctx.device))
            scores = scores.float().cpu()
            target = s.target[None]
            loss_sum += float(F.cross_entropy(scores, target, ignore_index=IGNORE_INDEX, reduction="sum"))
            pixels += int((target != IGNORE_INDEX).sum())
            probs = scores.softmax(1)
            meter.update(probs, target)
            if len(examples) < 4:  # a volume is shown by its middle slice
                mid = s.target.shape[0] // 2 if s.target.dim() == 3 else None
                examples.append((s, probs[0]) if mid is None else
                                (replace(s, name=f"{s.name} z={mid}", image=s.image[:, mid], target=s.target[mid]),
                                 probs[0, :, mid]))
        metrics = meter.compute()
        metrics["loss"] = loss_sum / max(1, pixels)
        return metrics, examples

    def checkpoint_fields(self) -> dict:
        return {"classes": self.classes, "mean_image": None, "meta": self._meta()}

    def _meta(self, threshold: float | None = None) -> dict:
        cfg = self.cfg
        return {"patch": list(self.patch), "border": cfg.border,
                "preprocess": {"normalize": cfg.normalize, "contrast": cfg.contrast},
                "threshold": threshold, "positive_class": cfg.positive_class,
                "palette": cfg.palette or None, "ignore_value": cfg.ignore_value, "mask_mode": cfg.mask_mode,
                "valid_region": cfg.valid is not None, "select": self.key,
                "symmetries": JointAugment.from_spec(cfg.augment).symmetries(),
                "layouts": self.dense.core.chooser.chosen(),
                "volume": self.volume.meta() if self.volume is not None else None}

    def restore(self, ckpt) -> None:
        self.dense.core.chooser.pinned = dict(ckpt.meta.get("layouts", {}))  # compute as before the interruption

    def epoch_line(self, epoch, cfg, lr, train, val, seconds) -> str:
        scores = "  ".join(f"{k} {val[k]:.4f}" for k in ("pixel_accuracy", "mean_iou", "f1", "roc_auc") if k in val)
        return (f"epoch {epoch}/{cfg.epochs}  lr {lr:.3g}  train loss {train['loss']:.4f}  "
                f"held-out loss {val['loss']:.4f}  {scores}  ({seconds:.1f}s)")

    def curve_keys(self):
        return self.curve

    def on_best(self, out, epoch, val, artifacts, cfg) -> None:
        from cnnkit.segmentation.pictures import plot_examples

        plot_examples(artifacts, out / "examples.png", palette=cfg.palette or None,
                      title=f"{cfg.model}, held-out images, epoch {epoch}")

    def finish(self, cfg, ctx, out: Path, best_path: Path, summary: dict) -> None:
        """Two classes: the F1-maximising threshold on the held-out images, stored in best.safetensors."""
        if not self.val or not best_path.exists():
            return
        from cnnkit.segmentation.predict import Segmenter
        from cnnkit.train.checkpoint import load_checkpoint, save_checkpoint
        from cnnkit.utils import write_json_atomic

        if ctx.is_main:
            ckpt = load_checkpoint(best_path)
            segmenter = Segmenter([ckpt], tta=cfg.threshold_tta, device=ctx.device, threshold=None,
                                  max_memory=int(cfg.max_memory_mb * 2**20) if cfg.max_memory_mb else None,
                                  allow_code=cfg.model if ":" in cfg.model else ())
            meter = SegmentationMeter(len(self.classes), positive=cfg.positive_class)
            for (image, valid), s in zip(self.val_raw, self.val):
                meter.update(segmenter.probabilities(image, valid)[None], s.target[None])
            heldout = meter.compute()
            if len(self.classes) == 2:
                ckpt.meta["threshold"] = heldout["best_threshold"]
                ckpt.meta.pop("path", None)
                save_checkpoint(best_path, ckpt)
                log.info("held-out threshold %.4f (F1 %.4f, at argmax %.4f; ROC AUC %.4f%s), stored in %s",
                         heldout["best_threshold"], heldout["best_threshold_f1"], heldout["f1"], heldout["roc_auc"],
                         "; mean of the 8 flips/rotations" if cfg.threshold_tta else "", best_path)
            summary["heldout"] = {k: v for k, v in heldout.items() if k != "confusion_matrix"}
            write_json_atomic(out / "heldout.json", {"checkpoint": str(best_path), "tta": cfg.threshold_tta,
                                                     **heldout})
        ctx.barrier()


def _class_weights(samples: list[SegmentationSample], k: int) -> torch.Tensor:
    """Inverse class frequency of the training masks, normalised so that the mean pixel weighs 1
    (vessels are 9% of a retina: a vessel pixel then weighs about 5.5, a background pixel 0.55)."""
    counts = torch.zeros(k, dtype=torch.float64)
    for s in samples:
        t = s.target[s.target != IGNORE_INDEX]
        counts += torch.bincount(t, minlength=k)[:k].double()
    present = counts > 0
    weight = torch.zeros(k, dtype=torch.float64)
    weight[present] = counts.sum() / (present.sum() * counts[present])
    return weight.float()


def _load(cfg: SegmentConfig) -> tuple[list, list, str]:
    if cfg.data == "generated":
        samples = generate_textured_shapes(cfg.generated_count, seed=cfg.seed,
                                           num_classes=cfg.num_classes or 3)
        train, val = split_samples(samples, cfg.val_fraction, cfg.seed)
        return train, val, f"generated textured shapes ({cfg.generated_count} images)"
    kw = dict(images=cfg.images, masks=cfg.masks, mask_mode=cfg.mask_mode,
              palette=[tuple(c) for c in cfg.palette] or None, ignore_value=cfg.ignore_value,
              skip_unpaired=cfg.skip_unpaired, mask_suffix=cfg.mask_suffix, image_suffix=cfg.image_suffix)
    if VolumeMode.parse(cfg.volume) is None:
        load = load_folder
        kw.update(valid=cfg.valid, resize_to_mask=cfg.resize_to_mask, scale=cfg.scale)
    else:
        load = load_volume_folder
    samples = load(Path(cfg.data), **kw)
    if cfg.val_data:
        return samples, load(Path(cfg.val_data), **kw), f"{cfg.data} (held out: {cfg.val_data})"
    train, val = split_samples(samples, cfg.val_fraction, cfg.seed)
    return train, val, cfg.data


def fit_segmentation(cfg: SegmentConfig, *, resume: bool = False, progress: bool | None = None) -> dict:
    """``runner.fit`` with the segmentation task."""
    from cnnkit.train.runner import fit

    return fit(cfg, resume=resume, progress=progress, task=SegmentationTask())


__all__ = ["CropDataset", "CropNet", "SegmentConfig", "SegmentationTask", "fit_segmentation", "pixel_losses"]
