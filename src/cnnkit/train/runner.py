"""A training run: data -> model -> engine -> run folder (metrics, plots, checkpoints).

The run folder holds::

    args.json            the resolved configuration (plus device, classes, data description)
    config.toml          the same, readable by `cnnkit train --config`
    metrics.csv          one row per epoch (train/val loss, top-1, top-5, learning rate, seconds)
    curves.png           training curves
    confusion.png        confusion matrix of the best epoch on the held-out split
    last.safetensors     checkpoint after the latest epoch (resume from here)
    best.safetensors     checkpoint of the epoch with the best held-out top-1 accuracy
    test.json            the recipe's test protocol (10-crop, multi-scale) on the best checkpoint

Every file is written atomically, so an interrupted run leaves the previous epoch's files intact and
``resume=True`` continues from ``last.safetensors``. With the same seed a resumed CPU run gives
weights identical, bit for bit, to an uninterrupted one.

Image sizes and the mean. Images are loaded at ``load_size`` (default: the model's input size); the
augmentation must bring them to the input size (``crop``, ``scale=...``, ``aspect=...``), and held-out
images are evaluated on their central crop. The subtracted mean is always an image of the input size:
``mean="image"`` is the training set's mean image (its central crop when images are loaded larger:
exactly the mean of the held-out views, and close to that of random crops), ``mean="channel"`` the
per-channel mean (VGG) stored as constant planes. It is subtracted after augmentation.
"""

from __future__ import annotations

import csv
import inspect
import io
import logging
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from cnnkit.data import compute_mean_image, load_dataset
from cnnkit.data.augment import CenterCrop, parse_augment, rgb_pca
from cnnkit.errors import CheckpointError, ConfigError
from cnnkit.models import create, model_info
from cnnkit.train import distributed
from cnnkit.train.checkpoint import (
    Checkpoint,
    capture_rng_state,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)
from cnnkit.train.config import SCHEDULES, TrainConfig, to_toml
from cnnkit.train.engine import evaluate, train_one_epoch
from cnnkit.train.losses import l2_normalize_head_input, make_loss
from cnnkit.train.plots import plot_confusion, plot_training_curves
from cnnkit.train.tta import Predictor, check_protocol, evaluate_predictors
from cnnkit.utils import atomic_path, ensure_writable_dir, seed_everything, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["SCHEDULES", "TrainConfig", "build_model", "fit", "model_channels"]

PCA_IMAGES = 2000  # images the RGB covariance of PCA colour noise is estimated from


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


def _make_optimizer(model, cfg: TrainConfig):
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class StepFactors:
    """Learning-rate factor of epoch e (1-based): that of the last [first_epoch, factor] with first_epoch <= e."""

    def __init__(self, steps: list):
        self.steps = sorted([int(e), float(f)] for e, f in steps)

    def __call__(self, completed: int) -> float:
        factor = 1.0
        for first, f in self.steps:
            if first <= completed + 1:
                factor = f
        return factor


def _make_scheduler(optimizer, cfg: TrainConfig):
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.gamma, patience=cfg.patience)
    if cfg.schedule == "piecewise":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, StepFactors(cfg.lr_steps))
    return None


def _averager(model, cfg: TrainConfig):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if cfg.weight_average == "none":
        return None
    if cfg.weight_average == "ema":
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    return AveragedModel(model, use_buffers=True)  # Polyak: the running mean of the iterates


AUGMENT_STREAM, WORKER_STREAM, DROPOUT_STREAM = 0, 1 << 20, 2 << 20  # + rank for the last two


def _epoch_seed(cfg: TrainConfig, epoch: int, stream: int) -> int:
    """A seed for one random stream of one epoch: a run repeats, and a resumed run continues exactly."""
    return (cfg.seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % 2**62


def _loader(dataset, cfg: TrainConfig, ctx, *, shuffle: bool, epoch: int = 0) -> DataLoader:
    # The batch order is a function of (seed, epoch) alone, so a resumed run sees the same batches as an
    # uninterrupted one, and N processes see slices of the batches one process would see.
    sampler = distributed.GlobalBatchSampler(len(dataset), cfg.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                             shuffle=shuffle, seed=cfg.seed * 100_003 + epoch)
    # The generator only seeds the workers; without one, DataLoader would draw from the global RNG.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=False,
                      generator=torch.Generator().manual_seed(_epoch_seed(cfg, epoch, WORKER_STREAM + ctx.rank)))


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


METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc1", "train_acc5", "val_loss", "val_acc1", "val_acc5",
                  "seconds"]


def _write_metrics(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _resumed_config(cfg: TrainConfig, ckpt: Checkpoint, last_path: Path) -> TrainConfig:
    saved = TrainConfig.from_dict(ckpt.meta["config"])
    if saved.model != cfg.model:
        raise CheckpointError(f"{last_path} holds model {saved.model!r} but {cfg.model!r} was asked for; "
                              f"use --model {saved.model} or another --out")
    # How to run may change on resume; what to compute may not.
    for name in ("epochs", "device", "out", "workers", "compile", "channels_last"):
        setattr(saved, name, getattr(cfg, name))
    return saved


def fit(cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> dict:
    """Train ``cfg.model`` on ``cfg.data``; returns a summary (accuracies, paths, epochs run).

    Under ``torchrun`` every process calls this; they train one model together (see
    ``cnnkit.train.distributed``) and only rank 0 writes files. A run that fails before its first file
    is written leaves no (empty) run folder behind.
    """
    created = not Path(cfg.out).exists()
    ctx = distributed.init(cfg.device)
    try:
        summary = _fit(cfg, ctx, resume, progress if ctx.is_main else False)
    except BaseException:
        ctx.close(failed=True)
        out = Path(cfg.out)
        if ctx.is_main and created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    ctx.close()
    return summary


def _fit(cfg: TrainConfig, ctx, resume: bool, progress) -> dict:
    if not ctx.is_main:
        logging.getLogger("cnnkit").setLevel(logging.WARNING)
    out = ensure_writable_dir(cfg.out)
    last_path, best_path = out / "last.safetensors", out / "best.safetensors"
    ckpt = None
    if resume:
        if not last_path.exists():
            raise CheckpointError(f"nothing to resume in {out} (no last.safetensors); "
                                  "drop --resume to start a new run there")
        ckpt = load_checkpoint(last_path)
        cfg = _resumed_config(cfg, ckpt, last_path)
    cfg.validate()
    device = ctx.device

    seed_everything(cfg.seed)
    info = model_info(cfg.model)
    size = tuple(cfg.input_size) if cfg.input_size else tuple(info.input_size[1:])
    load = tuple(cfg.load_size) if cfg.load_size else size
    check_protocol(cfg.tta, cfg.tta_scales, size, load)  # now, not after the last epoch
    splits, augment = _data_and_augment(cfg, size, load)
    num_classes = len(splits.classes)
    view = CenterCrop(size) if load != size else None  # held-out images: the central crop
    loss_fn = make_loss(cfg.loss)

    model = build_model(cfg.model, num_classes, splits.channels, cfg.dropout, cfg.model_options)
    check_protocol(cfg.tta, cfg.tta_scales, size, load, model)
    if cfg.l2_features:
        l2_normalize_head_input(model)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(model, cfg)
    scheduler = _make_scheduler(optimizer, cfg)
    averaged = _averager(model, cfg)
    if ckpt is not None:
        mean, history, start = _restore(ckpt, model, averaged, optimizer, scheduler, last_path)
        log.info("resuming %s from epoch %d on %d process(es)", out, start - 1, ctx.world_size)
    else:
        mean, history, start = mean_for_input(splits.train, cfg.mean, size), [], 1
    mean = mean.to(device)
    train_net = distributed.wrap(model, ctx)
    if cfg.compile:
        train_net = torch.compile(train_net)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    if ctx.is_main:
        write_json_atomic(out / "args.json", {**asdict(cfg), "resolved_device": str(device),
                                              "processes": ctx.world_size, "classes": splits.classes,
                                              "data_description": splits.description})
        write_text_atomic(out / "config.toml", to_toml(cfg, header=f"cnnkit train --config {out / 'config.toml'}"))

    best_acc = max((r["val_acc1"] for r in history), default=-1.0)
    val_loader = _loader(splits.val, cfg, ctx, shuffle=False)
    run = {"device": device, "num_classes": num_classes, "mean": mean, "loss_fn": loss_fn, "progress": progress,
           "precision": cfg.precision, "channels_last": cfg.channels_last}
    show = sys.stderr.isatty() if progress is None else bool(progress)
    for epoch in tqdm(range(start, cfg.epochs + 1), desc="epochs", initial=start - 1, total=cfg.epochs,
                      disable=not show, dynamic_ncols=True):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        if ctx.distributed:  # dropout masks: independent per process, repeatable per (seed, epoch, rank)
            torch.manual_seed(_epoch_seed(cfg, epoch, DROPOUT_STREAM + ctx.rank))
        loader = _loader(splits.train, cfg, ctx, shuffle=True, epoch=epoch)
        averaging = averaged is not None and epoch >= cfg.average_start
        train, _ = train_one_epoch(
            train_net, loader, optimizer, epoch=epoch, augment=augment if len(augment) else None,
            generator=torch.Generator().manual_seed(_epoch_seed(cfg, epoch, AUGMENT_STREAM)),
            layout=loader.batch_sampler.layout,
            world_size=ctx.world_size, scaler=scaler, aux_weight=cfg.aux_weight,
            averaged=averaged if averaging else None, averaged_source=model, **run)
        eval_net = averaged.module if averaged is not None and averaged.n_averaged > 0 else model
        val, confusion = evaluate(eval_net, val_loader, desc=f"epoch {epoch} val", view=view, **run)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val["loss"] if cfg.plateau_metric == "loss" else 1 - val["acc1"])
        elif scheduler is not None:
            scheduler.step()
        row = {"epoch": epoch, "lr": lr, **{f"train_{k}": v for k, v in train.items()},
               **{f"val_{k}": v for k, v in val.items()}, "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        log.info("epoch %d/%d  lr %.3g  train loss %.4f acc %.4f  val loss %.4f top-1 %.4f top-5 %.4f  (%.1fs)",
                 epoch, cfg.epochs, lr, train["loss"], train["acc1"], val["loss"], val["acc1"], val["acc5"],
                 row["seconds"])
        if ctx.is_main:
            _save_epoch(cfg, out, model, averaged, optimizer, scheduler, mean, splits, epoch, history, val, size,
                        load, best_acc, confusion)
        best_acc = max(best_acc, val["acc1"])
    ctx.barrier()  # rank 0's files are complete before anyone reads them

    final = history[-1] if history else {}
    best = max(history, key=lambda r: r["val_acc1"]) if history else {}
    summary = {"out": str(out), "epochs": len(history), "final": final, "best": best,
               "last_checkpoint": str(last_path), "best_checkpoint": str(best_path),
               "data": splits.description, "classes": splits.classes, "is_main": ctx.is_main,
               "processes": ctx.world_size}
    if cfg.tta != "center" and best_path.exists():
        summary["test"] = _test_protocol(cfg, ctx, best_path, splits.val, size, num_classes)
        if ctx.is_main:
            write_json_atomic(out / "test.json", summary["test"])
    return summary


def _data_and_augment(cfg: TrainConfig, size, load):
    splits = load_dataset(cfg.data, load, channels=model_channels(cfg.model), val_fraction=cfg.val_fraction,
                          seed=cfg.seed, skip_bad_files=cfg.skip_bad_files)
    log.info("data: %s", splits.description)
    pca = training_pca(splits.train) if "pca" in cfg.augment else None
    augment = parse_augment(cfg.augment, size, pca=pca)
    if augment.output_size(load) != size:
        raise ConfigError(f"--augment '{augment.spec() or 'none'}' turns {load[0]}x{load[1]} images into "
                          f"{'x'.join(map(str, augment.output_size(load)))}, but {cfg.model} takes "
                          f"{size[0]}x{size[1]}; add crop, scale=... or aspect=..., or change --load-size")
    return splits, augment


def _restore(ckpt: Checkpoint, model, averaged, optimizer, scheduler, path: Path):
    """Load a checkpoint's state into the run; returns (mean image, history, first epoch to run)."""
    load_weights(model, ckpt.live_state or ckpt.model_state, source=str(path))
    if averaged is not None and ckpt.meta.get("n_averaged", 0) > 0:
        load_weights(averaged.module, ckpt.model_state, source=str(path))
        averaged.n_averaged.fill_(int(ckpt.meta["n_averaged"]))
    optimizer.load_state_dict(ckpt.optimizer_state)
    if scheduler is not None and ckpt.scheduler_state is not None:
        scheduler.load_state_dict(ckpt.scheduler_state)
    restore_rng_state(ckpt.rng_state["tensors"], ckpt.rng_state["doc"])
    return ckpt.mean_image, list(ckpt.meta.get("history", [])), ckpt.epoch + 1


def _save_epoch(cfg, out, model, averaged, optimizer, scheduler, mean, splits, epoch, history, val, size, load,
                best_acc, confusion) -> None:
    n_averaged = int(averaged.n_averaged) if averaged is not None else 0
    weights = averaged.module.state_dict() if n_averaged > 0 else model.state_dict()
    rng_tensors, rng_doc = capture_rng_state()
    state = Checkpoint(
        model_name=cfg.model, model_options=dict(model.model_options), model_state=weights,
        classes=splits.classes, mean_image=mean, epoch=epoch, optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict() if scheduler is not None else None,
        rng_state={"tensors": rng_tensors, "doc": rng_doc},
        live_state=model.state_dict() if n_averaged > 0 else None,
        meta={"config": asdict(cfg), "history": history, "val": val, "channels": splits.channels,
              "input_size": list(size), "load_size": list(load), "n_averaged": n_averaged,
              "data_description": splits.description},
    )
    last_path, best_path = out / "last.safetensors", out / "best.safetensors"
    save_checkpoint(last_path, state)
    if val["acc1"] > best_acc:
        _copy_atomic(last_path, best_path)
        plot_confusion(confusion, splits.classes, out / "confusion.png",
                       title=f"{cfg.model} on held-out data, epoch {epoch}: top-1 {val['acc1']:.4f}")
    _write_metrics(out / "metrics.csv", history)
    plot_training_curves(history, out / "curves.png", title=f"{cfg.model} on {cfg.data}")


def _test_protocol(cfg, ctx, best_path: Path, val_set, size, num_classes) -> dict:
    ckpt = load_checkpoint(best_path)
    model = ckpt.build_model().to(ctx.device)
    predictor = Predictor(model, ckpt.mean_image.to(ctx.device), size, mode=cfg.tta, scales=cfg.tta_scales)
    metrics, _ = evaluate_predictors([predictor], _loader(val_set, cfg, ctx, shuffle=False), num_classes,
                                     device=ctx.device)
    log.info("test protocol %s%s on the best checkpoint: top-1 %.4f top-5 %.4f", cfg.tta,
             f" {cfg.tta_scales}" if cfg.tta == "multiscale" else "", metrics["acc1"], metrics["acc5"])
    return {"protocol": cfg.tta, "scales": cfg.tta_scales, "checkpoint": str(best_path), **metrics}
