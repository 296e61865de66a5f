"""A training run: data -> model -> engine -> run folder (metrics, plots, checkpoints).

The run folder holds::

    args.json            the resolved configuration
    metrics.csv          one row per epoch (train/val loss, top-1, top-5, learning rate, seconds)
    curves.png           training curves
    confusion.png        confusion matrix of the best epoch on the held-out split
    last.safetensors     checkpoint after the latest epoch (resume from here)
    best.safetensors     checkpoint of the epoch with the best held-out top-1 accuracy

Every file is written atomically, so an interrupted run leaves the previous epoch's files intact and
``resume=True`` continues from ``last.safetensors``. With the same seed a resumed CPU run gives
weights identical, bit for bit, to an uninterrupted one.
"""

from __future__ import annotations

import csv
import inspect
import io
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cnnkit.data import compute_mean_image, load_dataset
from cnnkit.errors import CheckpointError, ConfigError
from cnnkit.models import create, model_info
from cnnkit.train.checkpoint import (
    Checkpoint,
    capture_rng_state,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)
from cnnkit.train.engine import evaluate, train_one_epoch
from cnnkit.train.plots import plot_confusion, plot_training_curves
from cnnkit.utils import atomic_path, ensure_writable_dir, resolve_device, seed_everything, write_json_atomic

log = logging.getLogger(__name__)

SCHEDULES = ("step", "plateau", "none")


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved as ``args.json`` and inside every checkpoint."""

    data: str = "digits"
    model: str = "lenet5"
    model_options: dict = field(default_factory=dict)  # extra builder options, e.g. {"dropout": 0.5}
    out: str = "runs/train"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    step_size: int = 8  # epochs between learning-rate drops (schedule "step")
    gamma: float = 0.1  # learning-rate factor at each drop (step and plateau)
    patience: int = 2  # epochs without improvement before a drop (schedule "plateau")
    dropout: float = 0.0
    input_size: tuple[int, int] | None = None  # (H, W); default: the model's native size
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    skip_bad_files: bool = False

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.step_size >= 1, f"--step-size must be at least 1, got {self.step_size}"),
            (0 < self.gamma <= 1, f"--gamma must be in (0, 1], got {self.gamma}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (0 < self.val_fraction < 1, f"--val-fraction must be in (0, 1), got {self.val_fraction}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        model_info(self.model)  # unknown model -> ConfigError

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if cfg.input_size is not None:
            cfg.input_size = tuple(cfg.input_size)
        return cfg


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


def _make_scheduler(optimizer, cfg: TrainConfig):
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.gamma, patience=cfg.patience)
    return None


def _loader(dataset, cfg: TrainConfig, *, shuffle: bool, epoch: int = 0, device=None) -> DataLoader:
    # A fresh generator per epoch makes the batch order a function of (seed, epoch) alone, so a
    # resumed run sees the same batches as an uninterrupted one.
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=shuffle, generator=generator,
                      num_workers=cfg.workers, pin_memory=device is not None and device.type == "cuda",
                      persistent_workers=False)


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


def fit(cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> dict:
    """Train ``cfg.model`` on ``cfg.data``; returns a summary (accuracies, paths, epochs run).

    A run that fails before its first file is written leaves no (empty) run folder behind.
    """
    created = not Path(cfg.out).exists()
    try:
        return _fit(cfg, resume=resume, progress=progress)
    except BaseException:
        out = Path(cfg.out)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _fit(cfg: TrainConfig, *, resume: bool, progress: bool | None) -> dict:
    out = ensure_writable_dir(cfg.out)
    last_path, best_path = out / "last.safetensors", out / "best.safetensors"
    ckpt = None
    if resume:
        if not last_path.exists():
            raise CheckpointError(f"nothing to resume in {out} (no last.safetensors); "
                                  "drop --resume to start a new run there")
        ckpt = load_checkpoint(last_path)
        saved = TrainConfig.from_dict(ckpt.meta["config"])
        if saved.model != cfg.model:
            raise CheckpointError(f"{last_path} holds model {saved.model!r} but {cfg.model!r} was asked for; "
                                  f"use --model {saved.model} or another --out")
        saved.epochs, saved.device, saved.out, saved.workers = cfg.epochs, cfg.device, cfg.out, cfg.workers
        cfg = saved
    cfg.validate()
    device = resolve_device(cfg.device)

    seed_everything(cfg.seed)
    info = model_info(cfg.model)
    size = tuple(cfg.input_size) if cfg.input_size else info.input_size[1:]
    splits = load_dataset(cfg.data, size, channels=model_channels(cfg.model), val_fraction=cfg.val_fraction,
                          seed=cfg.seed, skip_bad_files=cfg.skip_bad_files)
    num_classes = len(splits.classes)
    log.info("data: %s", splits.description)
    model = build_model(cfg.model, num_classes, splits.channels, cfg.dropout, cfg.model_options).to(device)
    optimizer = _make_optimizer(model, cfg)
    scheduler = _make_scheduler(optimizer, cfg)
    history: list[dict] = []
    start = 1
    if ckpt is not None:
        load_weights(model, ckpt.model_state, source=str(last_path))
        optimizer.load_state_dict(ckpt.optimizer_state)
        if scheduler is not None and ckpt.scheduler_state is not None:
            scheduler.load_state_dict(ckpt.scheduler_state)
        mean = ckpt.mean_image
        history = list(ckpt.meta.get("history", []))
        restore_rng_state(ckpt.rng_state["tensors"], ckpt.rng_state["doc"])
        start = ckpt.epoch + 1
        log.info("resuming %s from epoch %d", out, ckpt.epoch)
    else:
        mean = compute_mean_image(splits.train)
    mean = mean.to(device)
    write_json_atomic(out / "args.json", {**asdict(cfg), "resolved_device": str(device),
                                          "classes": splits.classes, "data_description": splits.description})

    best_acc = max((r["val_acc1"] for r in history), default=-1.0)
    val_loader = _loader(splits.val, cfg, shuffle=False, device=device)
    show = sys.stderr.isatty() if progress is None else progress
    for epoch in tqdm(range(start, cfg.epochs + 1), desc="epochs", initial=start - 1, total=cfg.epochs,
                      disable=not show, dynamic_ncols=True):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train, _ = train_one_epoch(model, _loader(splits.train, cfg, shuffle=True, epoch=epoch, device=device),
                                   optimizer, device=device, num_classes=num_classes, mean=mean,
                                   epoch=epoch, progress=progress)
        val, confusion = evaluate(model, val_loader, device=device, num_classes=num_classes, mean=mean,
                                  progress=progress, desc=f"epoch {epoch} val")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val["loss"])
        elif scheduler is not None:
            scheduler.step()
        row = {"epoch": epoch, "lr": lr, **{f"train_{k}": v for k, v in train.items()},
               **{f"val_{k}": v for k, v in val.items()}, "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        log.info("epoch %d/%d  lr %.3g  train loss %.4f acc %.4f  val loss %.4f top-1 %.4f top-5 %.4f  (%.1fs)",
                 epoch, cfg.epochs, lr, train["loss"], train["acc1"], val["loss"], val["acc1"], val["acc5"],
                 row["seconds"])

        rng_tensors, rng_doc = capture_rng_state()
        state = Checkpoint(
            model_name=cfg.model, model_options=dict(model.model_options), model_state=model.state_dict(),
            classes=splits.classes, mean_image=mean, epoch=epoch, optimizer_state=optimizer.state_dict(),
            scheduler_state=scheduler.state_dict() if scheduler is not None else None,
            rng_state={"tensors": rng_tensors, "doc": rng_doc},
            meta={"config": asdict(cfg), "history": history, "val": val, "channels": splits.channels,
                  "input_size": list(size), "data_description": splits.description},
        )
        save_checkpoint(last_path, state)
        if val["acc1"] > best_acc:
            best_acc = val["acc1"]
            _copy_atomic(last_path, best_path)
            plot_confusion(confusion, splits.classes, out / "confusion.png",
                           title=f"{cfg.model} on held-out data, epoch {epoch}: top-1 {val['acc1']:.4f}")
        _write_metrics(out / "metrics.csv", history)
        plot_training_curves(history, out / "curves.png", title=f"{cfg.model} on {cfg.data}")

    final = history[-1] if history else {}
    best = max(history, key=lambda r: r["val_acc1"]) if history else {}
    return {"out": str(out), "epochs": len(history), "final": final, "best": best,
            "last_checkpoint": str(last_path), "best_checkpoint": str(best_path),
            "data": splits.description, "classes": splits.classes}
