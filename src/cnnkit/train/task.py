"""What the runner needs from a kind of training: the :class:`Task` interface.

The runner (``cnnkit.train.runner``) owns everything every training run shares: the run folder
(args.json, config.toml, metrics.csv, curves.png), checkpoints and ``--resume``, the optimiser and
schedule, weight averaging, mixed precision, ``torchrun`` processes and progress. A task owns what
differs between image classification and pixelwise classification: its data, its model, one epoch of
training steps, held-out evaluation and the pictures and final steps that go with them.

A task's epoch must be a function of (seed, epoch) alone, so that a resumed run repeats an
uninterrupted one bit for bit, and N processes compute what one process computes (each takes its
slice of every global batch, see ``cnnkit.train.distributed``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class Task:
    """Base class: the hooks :func:`cnnkit.train.runner.fit` calls, in this order.

    ``prepare`` (data) -> ``build_model`` -> ``init_state`` or ``restore`` -> per epoch
    ``train_epoch`` and ``evaluate`` (and ``on_best`` when the held-out score improved) -> ``finish``.
    """

    name = "task"
    #: the command that reads the run's config.toml back (its first line)
    command = "cnnkit train"
    #: metrics.csv columns, in order ("epoch", "lr" and "seconds" included)
    metric_columns: list[str] = []
    #: the held-out metric that picks best.safetensors (higher is better)
    select_key = "val_acc1"

    # --- set by prepare
    classes: list[str]
    channels: int
    description: str

    def prepare(self, cfg, ctx) -> None:
        """Load and check the data (before anything is written)."""
        raise NotImplementedError

    def build_model(self, cfg) -> nn.Module:
        raise NotImplementedError

    def init_state(self, cfg) -> None:
        """State computed from the training data at the start of a new run (e.g. the mean image)."""

    def restore(self, ckpt) -> None:
        """The same state, read back from a checkpoint on resume."""

    def train_module(self, model: nn.Module) -> nn.Module:
        """The module whose forward the training step calls (wrapped for DDP by the runner)."""
        return model

    def train_epoch(self, net: nn.Module, model: nn.Module, optimizer, *, epoch: int, cfg, ctx, progress,
                    scaler=None, averaged=None) -> dict[str, float]:
        """One epoch of steps; returns training metrics (keys without the ``train_`` prefix)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, *, epoch: int, cfg, ctx, progress) -> tuple[dict[str, float], object]:
        """Held-out metrics (keys without the ``val_`` prefix) and artifacts for ``on_best``."""
        raise NotImplementedError

    def checkpoint_fields(self) -> dict:
        """Checkpoint contents besides weights and optimiser state: ``classes``, ``mean_image`` and
        ``meta`` (merged into the checkpoint's JSON metadata)."""
        return {"classes": self.classes, "mean_image": None, "meta": {}}

    def on_best(self, out: Path, epoch: int, val: dict, artifacts, cfg) -> None:
        """Pictures of the new best epoch (written by the main process only)."""

    def epoch_line(self, epoch: int, cfg, lr: float, train: dict, val: dict, seconds: float) -> str:
        return (f"epoch {epoch}/{cfg.epochs}  lr {lr:.3g}  train loss {train['loss']:.4f}  "
                f"val loss {val['loss']:.4f}  {self.select_key} {val[self.select_key[4:]]:.4f}  ({seconds:.1f}s)")

    def curve_keys(self) -> list[tuple[str, str]]:
        """(column, label) pairs drawn in the right-hand panel of curves.png."""
        return [(self.select_key, self.select_key[4:])]

    def finish(self, cfg, ctx, out: Path, best_path: Path, summary: dict) -> None:
        """After the last epoch (every process): e.g. a test protocol on the best checkpoint."""


def move(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model
