"""Pictures of a run: training curves and the confusion matrix, written as PNG (atomically)."""

from __future__ import annotations

from pathlib import Path

import torch

from cnnkit.utils import atomic_path


def _pyplot():
    """matplotlib.pyplot with the file-only Agg backend, imported on first use (it costs every command a
    third of a second at start-up otherwise)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot

    return matplotlib.pyplot


def __getattr__(name: str):  # `from cnnkit.train.plots import plt` imports pyplot then
    if name == "plt":
        return _pyplot()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save_figure(fig, path: Path) -> None:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_training_curves(rows: list[dict], path: Path, title: str = "",
                         metrics: list[tuple[str, str]] | None = None) -> None:
    """Loss (left, train and held-out) and the chosen metric columns (right) per epoch.

    ``metrics``: (column, label) pairs; default train and held-out top-1 accuracy."""
    plt = _pyplot()
    metrics = metrics or [("train_acc1", "train top-1"), ("val_acc1", "held-out top-1")]
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "s-", label="held-out")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log", title="loss")
    for (column, label), marker in zip(metrics, "os^vD*"):
        ax_acc.plot(epochs, [r.get(column, float("nan")) for r in rows], f"{marker}-", label=label)
    ax_acc.set(xlabel="epoch", ylabel="score", title="held-out scores" if len(metrics) > 2 else "accuracy",
               ylim=(0, 1.01))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix with counts in the cells (up to 30 classes labelled)."""
    plt = _pyplot()
    cm = confusion.double()
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    k = len(classes)
    size = min(2 + 0.45 * k, 14)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=45 if max(map(len, classes)) > 3 else 0, ha="right")
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                if cm[i, j] > 0:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    acc = float(cm.diag().sum() / cm.sum().clamp(min=1))
    ax.set(xlabel="predicted", ylabel="true", title=title or f"confusion matrix (accuracy {acc:.4f})")
    save_figure(fig, path)


def plot_augmentations(rows: list[tuple[str, torch.Tensor]], path: Path, title: str = "") -> None:
    """A grid of images: one labelled row per (label, (N, C, H, W) batch in [0, 1])."""
    plt = _pyplot()
    n = max(len(batch) for _, batch in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n + 1.8, 1.6 * len(rows)), squeeze=False,
                             layout="constrained")
    for r, (label, batch) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(batch):
                image = batch[c].detach().float().cpu().clamp(0, 1)
                ax.imshow((image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)).numpy(),
                          cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=1)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
