"""A training run: task (data, model, steps) -> the one engine -> run folder (metrics, plots, checkpoints).

Every command that trains goes through :func:`fit`: ``cnnkit train`` (image classification, the
default :class:`~cnnkit.train.classification.ClassificationTask`), ``cnnkit segment train``
(pixelwise classification, ``cnnkit.segmentation.task``), and the studies built on them. The run
folder holds::

    args.json            the resolved configuration (plus device, classes, data description)
    config.toml          the same, readable by ``--config``
    metrics.csv          one row per epoch (train and held-out metrics, learning rate, seconds)
    curves.png           training curves
    last.safetensors     checkpoint after the latest epoch (resume from here)
    best.safetensors     checkpoint of the epoch with the best held-out score (the task's select_key)

and what the task adds (classification: confusion.png of the best epoch and test.json, the recipe's
test protocol on the best checkpoint; segmentation: examples.png and the held-out threshold).

Every file is written atomically, so an interrupted run leaves the previous epoch's files intact and
``resume=True`` continues from ``last.safetensors``. With the same seed a resumed CPU run gives
weights identical, bit for bit, to an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from cnnkit.errors import CheckpointError, OutputError
from cnnkit.train import distributed
from cnnkit.train.checkpoint import (
    Checkpoint,
    capture_rng_state,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)
from cnnkit.train.classification import ClassificationTask, build_model, mean_for_input, model_channels
from cnnkit.train.config import SCHEDULES, TrainConfig, to_toml
from cnnkit.train.plots import plot_training_curves
from cnnkit.train.task import Task
from cnnkit.utils import (
    atomic_path,
    ensure_writable_dir,
    first_missing,
    remove_empty_folders,
    seed_everything,
    write_json_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

__all__ = ["SCHEDULES", "TrainConfig", "build_model", "fit", "mean_for_input", "model_channels"]


def _make_optimizer(model, cfg: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


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
    if cfg.schedule == "cosine":  # per epoch, from lr down to 0 at the last epoch
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return None


def _averager(model, cfg: TrainConfig):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if cfg.weight_average == "none":
        return None
    if cfg.weight_average == "ema":
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    return AveragedModel(model, use_buffers=True)  # Polyak: the running mean of the iterates


def _write_metrics(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _resumed_config(cfg: TrainConfig, ckpt: Checkpoint, last_path: Path, task: Task) -> TrainConfig:
    saved_task = ckpt.meta.get("task", "classify")
    if saved_task != task.name:
        raise CheckpointError(f"{last_path} is a {saved_task!r} run, not a {task.name!r} one; "
                              "resume it with its own command or choose another --out")
    saved = type(cfg).from_dict(ckpt.require("config"))
    if saved.model != cfg.model:
        raise CheckpointError(f"{last_path} holds model {saved.model!r} but {cfg.model!r} was asked for; "
                              f"use --model {saved.model} or another --out")
    # How to run may change on resume; what to compute may not.
    for name in ("epochs", "device", "out", "workers", "compile", "channels_last"):
        setattr(saved, name, getattr(cfg, name))
    return saved


class RunLock:
    """An exclusive lock on a run folder (``.lock``, flock): a second process training into the same folder
    is refused with one line naming the holder. The operating system releases the lock when its holder
    dies, so a killed run's folder is taken over without any clean-up."""

    def __init__(self, out: Path):
        self.path, self.fd = out / ".lock", None

    def __enter__(self) -> RunLock:
        import fcntl
        import os
        import socket

        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create {self.path} ({exc.strerror}); pass a writable --out") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise OutputError(f"run folder {self.path.parent} is in use by {holder}; wait for it to finish or "
                              "choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        import os

        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays (removing it would race a waiting process)
            self.fd = None


def _clean_stale_files(out: Path) -> None:
    """Temporary files of an interrupted write (atomic_path's ``.NAME.XXXX.tmp``) are garbage."""
    for p in out.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def _repair_best(out: Path, history: list[dict], key: str) -> None:
    """A kill between writing last.safetensors and copying it to best.safetensors, in the epoch that was
    the best, would leave best.safetensors an older epoch: copy it again (last holds that epoch)."""
    last_path, best_path = out / "last.safetensors", out / "best.safetensors"
    if not history or not last_path.exists():
        return
    best_epoch = max(history, key=lambda r: r[key])["epoch"]
    if best_epoch != history[-1]["epoch"]:
        return
    current = load_checkpoint(best_path).epoch if best_path.exists() else None
    if current != best_epoch:
        log.info("best.safetensors held epoch %s, not the best epoch %d: restored from last.safetensors",
                 current, best_epoch)
        _copy_atomic(last_path, best_path)


def fit(cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None, task: Task | None = None) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` as ``task`` (default: image classification); returns a summary
    (metrics of the last and best epochs, paths, epochs run).

    Under ``torchrun`` every process calls this; they train one model together (see
    ``cnnkit.train.distributed``) and only rank 0 writes files. A new run that fails before its first
    checkpoint (bad data, disk full) leaves no run folder behind.
    """
    task = task if task is not None else ClassificationTask()
    created = not Path(cfg.out).exists()
    top = first_missing(Path(cfg.out))  # with --out a/b/run, the first of a, a/b, a/b/run made here
    ctx = distributed.init(cfg.device)
    try:
        summary = _fit(cfg, ctx, resume, progress if ctx.is_main else False, task)
    except BaseException as exc:
        ctx.close(failed=True)
        out = Path(cfg.out)
        if ctx.is_main and created and out.is_dir() and not (out / "last.safetensors").exists():
            if isinstance(exc, Exception):  # failed before its first checkpoint: leave no folder behind
                shutil.rmtree(out, ignore_errors=True)
            elif all(p.name == ".lock" for p in out.iterdir()):  # interrupted: kept, unless it is empty
                (out / ".lock").unlink(missing_ok=True)
                out.rmdir()
            if not out.exists() and top is not None and top != out:  # and the parents made for it
                remove_empty_folders(out.parent, top)
        raise
    ctx.close()
    return summary


def _fit(cfg: TrainConfig, ctx, resume: bool, progress, task: Task) -> dict:
    if not ctx.is_main:
        logging.getLogger("cnnkit").setLevel(logging.WARNING)
    cfg.validate()
    out = ensure_writable_dir(cfg.out)
    if not ctx.is_main:
        return _fit_locked(cfg, ctx, resume, progress, task, out)
    with RunLock(out):
        _clean_stale_files(out)
        before = {p.name for p in out.iterdir()}
        try:
            return _fit_locked(cfg, ctx, resume, progress, task, out)
        except Exception:
            if not (out / "last.safetensors").exists():  # failed before its first checkpoint: take back what
                for name in ("args.json", "config.toml"):  # this run wrote (a folder it made goes whole)
                    if name not in before:
                        (out / name).unlink(missing_ok=True)
            raise


def _fit_locked(cfg: TrainConfig, ctx, resume: bool, progress, task: Task, out: Path) -> dict:
    last_path, best_path = out / "last.safetensors", out / "best.safetensors"
    ckpt = None
    if not resume and last_path.exists():
        raise CheckpointError(f"{out} already holds a run (last.safetensors); pass --resume to continue it, or "
                              "choose another --out (or delete the folder) to start afresh")
    if resume and not last_path.exists():  # e.g. killed before its first epoch ended: the same command resumes
        log.info("nothing to resume in %s (no last.safetensors yet): starting the run", out)
        resume = False
    if resume:
        ckpt = load_checkpoint(last_path)
        cfg = _resumed_config(cfg, ckpt, last_path, task)
        cfg.validate()
    device = ctx.device

    seed_everything(cfg.seed)
    task.prepare(cfg, ctx)
    model = task.build_model(cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(model, cfg)
    scheduler = _make_scheduler(optimizer, cfg)
    averaged = _averager(model, cfg)
    if ckpt is not None:
        history, start = _restore(ckpt, model, averaged, optimizer, scheduler, last_path)
        task.restore(ckpt)
        if ctx.is_main:  # a kill may have come between the epoch's files
            _repair_best(out, history, task.select_key)
            _write_metrics(out / "metrics.csv", history, task.metric_columns)
        log.info("resuming %s from epoch %d on %d process(es)", out, start - 1, ctx.world_size)
    else:
        task.init_state(cfg)
        history, start = [], 1
    train_net = distributed.wrap(task.train_module(model), ctx)
    if cfg.compile:
        train_net = torch.compile(train_net)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    if ctx.is_main:
        write_json_atomic(out / "args.json", {**asdict(cfg), "task": task.name, "resolved_device": str(device),
                                              "processes": ctx.world_size, "classes": task.classes,
                                              "data_description": task.description})
        write_text_atomic(out / "config.toml", to_toml(cfg, header=f"{task.command} --config {out / 'config.toml'}"))

    key = task.select_key
    best_score = max((r[key] for r in history), default=-float("inf"))
    pictures = _Pictures(task, cfg, out)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    for epoch in tqdm(range(start, cfg.epochs + 1), desc="epochs", initial=start - 1, total=cfg.epochs,
                      disable=not show, dynamic_ncols=True):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        averaging = averaged is not None and epoch >= cfg.average_start
        train = task.train_epoch(train_net, model, optimizer, epoch=epoch, cfg=cfg, ctx=ctx, progress=progress,
                                 scaler=scaler, averaged=averaged if averaging else None)
        eval_net = averaged.module if averaged is not None and averaged.n_averaged > 0 else model
        val, artifacts = task.evaluate(eval_net, epoch=epoch, cfg=cfg, ctx=ctx, progress=progress)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val["loss"] if cfg.plateau_metric == "loss" else 1 - val[key[4:]])
        elif scheduler is not None:
            scheduler.step()
        seconds = round(time.perf_counter() - t0, 3)
        row = {"epoch": epoch, "lr": lr, **{f"train_{k}": v for k, v in train.items()},
               **{f"val_{k}": v for k, v in val.items() if not isinstance(v, (list, dict))}, "seconds": seconds}
        history.append(row)
        log.info("%s", task.epoch_line(epoch, cfg, lr, train, val, seconds))
        if ctx.is_main:
            improved = row[key] > best_score
            _save_epoch(cfg, task, out, model, averaged, optimizer, scheduler, epoch, history, val, improved)
            pictures.update(history, (epoch, val, artifacts) if improved else None)
        best_score = max(best_score, row[key])
    ctx.barrier()  # rank 0's files are complete before anyone reads them

    final = history[-1] if history else {}
    best = max(history, key=lambda r: r[key]) if history else {}
    if best and best["epoch"] < start and best_path.exists():  # trained by a killed process: drawn or not?
        load_weights(model, load_checkpoint(best_path).model_state, source=str(best_path))
        pictures.best = (best["epoch"], *task.evaluate(model, epoch=best["epoch"], cfg=cfg, ctx=ctx,
                                                       progress=progress))
    if ctx.is_main:
        pictures.update(history, None, last=True)
    summary = {"out": str(out), "epochs": len(history), "final": final, "best": best,
               "last_checkpoint": str(last_path), "best_checkpoint": str(best_path),
               "data": task.description, "classes": task.classes, "is_main": ctx.is_main,
               "processes": ctx.world_size, "task": task.name}
    task.finish(cfg, ctx, out, best_path, summary)
    return summary


def _restore(ckpt: Checkpoint, model, averaged, optimizer, scheduler, path: Path):
    """Load a checkpoint's state into the run; returns (history, first epoch to run)."""
    load_weights(model, ckpt.live_state or ckpt.model_state, source=str(path))
    if averaged is not None and ckpt.meta.get("n_averaged", 0) > 0:
        load_weights(averaged.module, ckpt.model_state, source=str(path))
        averaged.n_averaged.fill_(int(ckpt.meta["n_averaged"]))
    optimizer.load_state_dict(ckpt.optimizer_state)
    if scheduler is not None and ckpt.scheduler_state is not None:
        scheduler.load_state_dict(ckpt.scheduler_state)
    restore_rng_state(ckpt.rng_state["tensors"], ckpt.rng_state["doc"])
    return list(ckpt.meta.get("history", [])), ckpt.epoch + 1


def _save_epoch(cfg, task: Task, out: Path, model, averaged, optimizer, scheduler, epoch, history, val,
                improved: bool) -> None:
    n_averaged = int(averaged.n_averaged) if averaged is not None else 0
    weights = averaged.module.state_dict() if n_averaged > 0 else model.state_dict()
    rng_tensors, rng_doc = capture_rng_state()
    fields = task.checkpoint_fields()
    state = Checkpoint(
        model_name=cfg.model, model_options=dict(model.model_options), model_state=weights,
        classes=fields["classes"], mean_image=fields["mean_image"], epoch=epoch,
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict() if scheduler is not None else None,
        rng_state={"tensors": rng_tensors, "doc": rng_doc},
        live_state=model.state_dict() if n_averaged > 0 else None,
        meta={"task": task.name, "config": asdict(cfg), "history": history, "val": val,
              "channels": task.channels, "n_averaged": n_averaged, "data_description": task.description,
              **fields["meta"]},
    )
    last_path, best_path = out / "last.safetensors", out / "best.safetensors"
    save_checkpoint(last_path, state)
    if improved:
        _copy_atomic(last_path, best_path)
    _write_metrics(out / "metrics.csv", history, task.metric_columns)


class _Pictures:
    """curves.png and the task's pictures of the best epoch, drawn at most every ``every`` seconds and
    after the last epoch (a drawing takes about a second: on short epochs it would cost more than
    training). The final drawing comes after the loop, so that a resumed run with nothing left to train
    (killed after its last checkpoint) draws it too; when the best epoch was trained before the resume,
    the runner recomputes its pictures' inputs from best.safetensors (evaluation depends on the weights
    alone), since the killed process may have died before drawing them."""

    def __init__(self, task: Task, cfg, out: Path, every: float = 30.0):
        self.task, self.cfg, self.out, self.every = task, cfg, out, every
        self.last = -float("inf")
        self.best = None  # (epoch, val, artifacts) not drawn yet

    def update(self, history: list[dict], best, last: bool = False) -> None:
        if best is not None:
            self.best = best
        if not last and time.monotonic() - self.last < self.every:
            return
        plot_training_curves(history, self.out / "curves.png", title=f"{self.cfg.model} on {self.cfg.data}",
                             metrics=self.task.curve_keys())
        if self.best is not None:
            epoch, val, artifacts = self.best
            self.task.on_best(self.out, epoch, val, artifacts, self.cfg)
            self.best = None
        self.last = time.monotonic()
