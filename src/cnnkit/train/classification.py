"""Image classification as a runner task: data, mean image, augmentation, top-1/top-5, confusion matrix.

Image sizes and the mean. Images are loaded at ``load_size`` (default: the model's input size); the
augmentation must bring them to the input size (``crop``, ``scale=...``, ``aspect=...``), and held-out
images are evaluated on their central crop. The subtracted mean is always an image of the input size:
``mean="image"`` is the training set's mean image (its central crop when images are loaded larger:
exactly the mean of the held-out views, and close to that of random crops), ``mean="channel"`` the
per-channel mean (VGG) stored as constant planes. It is subtracted after augmentation.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from cnnkit.data import compute_mean_image, load_dataset
from cnnkit.data.augment import CenterCrop, parse_augment, rgb_pca
from cnnkit.errors import ConfigError
from cnnkit.models import create, model_info
from cnnkit.train import distributed
from cnnkit.train.engine import evaluate, train_one_epoch
from cnnkit.train.losses import l2_normalize_head_input, make_loss
from cnnkit.train.plots import plot_confusion
from cnnkit.train.task import Task
from cnnkit.train.tta import Predictor, check_protocol, evaluate_predictors
from cnnkit.utils import write_json_atomic

log = logging.getLogger(__name__)

PCA_IMAGES = 2000  # images the RGB covariance of PCA colour noise is estimated from

AUGMENT_STREAM, WORKER_STREAM, DROPOUT_STREAM = 0, 1 << 20, 2 << 20  # + rank for the last two


def epoch_seed(cfg, epoch: int, stream: int) -> int:
    """A seed for one random stream of one epoch: a run repeats, and a resumed run continues exactly."""
    return (cfg.seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % 2**62


def make_loader(dataset, cfg, ctx, *, shuffle: bool, epoch: int = 0, collate_fn=None) -> DataLoader:
    """This process's slice of every global batch (see ``cnnkit.train.distributed``).

    The batch order is a function of (seed, epoch) alone, so a resumed run sees the same batches as an
    uninterrupted one, and N processes see slices of the batches one process would see.
    """
    sampler = distributed.GlobalBatchSampler(len(dataset), cfg.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                             shuffle=shuffle, seed=cfg.seed * 100_003 + epoch)
    # The generator only seeds the workers; without one, DataLoader would draw from the global RNG.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate_fn,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=False,
                      generator=torch.Generator().manual_seed(epoch_seed(cfg, epoch, WORKER_STREAM + ctx.rank)))


def build_model(name: str, num_classes: int, channels: int, dropout: float = 0.0, options: dict | None = None):
    """Create a zoo model, passing only the options its builder takes (``options`` are passed as given)."""
    params = inspect.signature(model_info(name).builder).parameters
    options = {**(options or {}), "num_classes": num_classes}
    if "in_chans" in params:
        options["in_chans"] = channels
    if "dropout" in params and dropout > 0:
        options["dropout"] = dropout
    return create(name, **options)


def model_channels(name: str) -> int | None:
    """None when the model adapts to the data's channels, else the channels it needs."""
    info = model_info(name)
    return None if "in_chans" in inspect.signature(info.builder).parameters else info.input_size[0]


def mean_for_input(train, mode: str, size: tuple[int, int]) -> torch.Tensor:
    """The (C, h, w) mean subtracted from inputs of ``size``: see the module docstring."""
    mean = compute_mean_image(train)  # (C, H, W) at the load size
    if mode == "channel":
        return mean.mean((1, 2), keepdim=True).expand(-1, *size).contiguous()
    top, left = (mean.shape[1] - size[0]) // 2, (mean.shape[2] - size[1]) // 2
    return mean[:, top : top + size[0], left : left + size[1]].contiguous()


def training_pca(train) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB eigenpairs of up to PCA_IMAGES evenly spaced training images (AlexNet used the whole set)."""
    step = max(1, len(train) // PCA_IMAGES)
    subset = Subset(train, range(0, len(train), step))
    return rgb_pca(x for x, _ in DataLoader(subset, batch_size=256))


class ClassificationTask(Task):
    """`cnnkit train`: a zoo model on a classification dataset, the training set's mean subtracted."""

    name = "classify"
    metric_columns = ["epoch", "lr", "train_loss", "train_acc1", "train_acc5", "val_loss", "val_acc1", "val_acc5",
                      "seconds"]
    select_key = "val_acc1"

    def prepare(self, cfg, ctx) -> None:
        info = model_info(cfg.model)
        self.size = tuple(cfg.input_size) if cfg.input_size else tuple(info.input_size[1:])
        self.load = tuple(cfg.load_size) if cfg.load_size else self.size
        check_protocol(cfg.tta, cfg.tta_scales, self.size, self.load)  # now, not after the last epoch
        splits = load_dataset(cfg.data, self.load, channels=model_channels(cfg.model),
                              val_fraction=cfg.val_fraction, seed=cfg.seed, skip_bad_files=cfg.skip_bad_files)
        log.info("data: %s", splits.description)
        pca = training_pca(splits.train) if "pca" in cfg.augment else None
        self.augment = parse_augment(cfg.augment, self.size, pca=pca)
        if self.augment.output_size(self.load) != self.size:
            out = "x".join(map(str, self.augment.output_size(self.load)))
            raise ConfigError(f"--augment '{self.augment.spec() or 'none'}' turns {self.load[0]}x{self.load[1]} "
                              f"images into {out}, but {cfg.model} takes {self.size[0]}x{self.size[1]}; add crop, "
                              "scale=... or aspect=..., or change --load-size")
        self.splits = splits
        self.classes, self.channels, self.description = splits.classes, splits.channels, splits.description
        self.view = CenterCrop(self.size) if self.load != self.size else None  # held-out: the central crop
        self.loss_fn = make_loss(cfg.loss)

    def build_model(self, cfg):
        model = build_model(cfg.model, len(self.classes), self.channels, cfg.dropout, cfg.model_options)
        check_protocol(cfg.tta, cfg.tta_scales, self.size, self.load, model)
        if cfg.l2_features:
            l2_normalize_head_input(model)
        return model

    def init_state(self, cfg) -> None:
        self.mean = mean_for_input(self.splits.train, cfg.mean, self.size)

    def restore(self, ckpt) -> None:
        self.mean = ckpt.mean_image

    def _run(self, cfg, ctx, progress) -> dict:
        return {"device": ctx.device, "num_classes": len(self.classes), "mean": self.mean.to(ctx.device),
                "loss_fn": self.loss_fn, "progress": progress, "precision": cfg.precision,
                "channels_last": cfg.channels_last}

    def train_epoch(self, net, model, optimizer, *, epoch, cfg, ctx, progress, scaler=None, averaged=None):
        if ctx.distributed:  # dropout masks: independent per process, repeatable per (seed, epoch, rank)
            torch.manual_seed(epoch_seed(cfg, epoch, DROPOUT_STREAM + ctx.rank))
        loader = make_loader(self.splits.train, cfg, ctx, shuffle=True, epoch=epoch)
        metrics, _ = train_one_epoch(
            net, loader, optimizer, epoch=epoch, augment=self.augment if len(self.augment) else None,
            generator=torch.Generator().manual_seed(epoch_seed(cfg, epoch, AUGMENT_STREAM)),
            layout=loader.batch_sampler.layout, world_size=ctx.world_size, scaler=scaler,
            aux_weight=cfg.aux_weight, averaged=averaged, averaged_source=model, **self._run(cfg, ctx, progress))
        return metrics

    def evaluate(self, model, *, epoch, cfg, ctx, progress):
        loader = make_loader(self.splits.val, cfg, ctx, shuffle=False)
        return evaluate(model, loader, desc=f"epoch {epoch} val", view=self.view, **self._run(cfg, ctx, progress))

    def checkpoint_fields(self) -> dict:
        return {"classes": self.classes, "mean_image": self.mean,
                "meta": {"input_size": list(self.size), "load_size": list(self.load)}}

    def on_best(self, out, epoch, val, artifacts, cfg) -> None:
        plot_confusion(artifacts, self.classes, out / "confusion.png",
                       title=f"{cfg.model} on held-out data, epoch {epoch}: top-1 {val['acc1']:.4f}")

    def epoch_line(self, epoch, cfg, lr, train, val, seconds) -> str:
        return (f"epoch {epoch}/{cfg.epochs}  lr {lr:.3g}  train loss {train['loss']:.4f} acc {train['acc1']:.4f}  "
                f"val loss {val['loss']:.4f} top-1 {val['acc1']:.4f} top-5 {val['acc5']:.4f}  ({seconds:.1f}s)")

    def curve_keys(self):
        return [("train_acc1", "train top-1"), ("val_acc1", "held-out top-1")]

    def finish(self, cfg, ctx, out: Path, best_path: Path, summary: dict) -> None:
        if cfg.tta == "center" or not best_path.exists():
            return
        from cnnkit.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(best_path)
        model = ckpt.build_model().to(ctx.device)
        predictor = Predictor(model, ckpt.mean_image.to(ctx.device), self.size, mode=cfg.tta, scales=cfg.tta_scales)
        metrics, _ = evaluate_predictors([predictor], make_loader(self.splits.val, cfg, ctx, shuffle=False),
                                         len(self.classes), device=ctx.device)
        log.info("test protocol %s%s on the best checkpoint: top-1 %.4f top-5 %.4f", cfg.tta,
                 f" {cfg.tta_scales}" if cfg.tta == "multiscale" else "", metrics["acc1"], metrics["acc5"])
        summary["test"] = {"protocol": cfg.tta, "scales": cfg.tta_scales, "checkpoint": str(best_path), **metrics}
        if ctx.is_main:
            write_json_atomic(out / "test.json", summary["test"])
