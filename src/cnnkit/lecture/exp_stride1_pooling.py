"""Section "stride1_pooling": "Pooling without downsampling (stride s = 1): invariance vs. information
loss (even if the resolution is not reduced)".

Max pooling over k x k windows with stride 1 (padded so that the map keeps the image's size), with
stride k, and no pooling at all, applied to the digits (18 x 18) and measured two ways:

- invariance: how much the pooled map changes when the image moves by one pixel (relative L2 change
  of the map at fixed positions, and the fraction of units that do not change at all);
- information: how much of the image a least-squares linear map recovers from the pooled map (R^2
  on held-out digits), and how many of the positions of a single bright pixel can be told apart
  from its pooled map (the "exactly where" of the slide).

No training: pooling has no parameters, and the read-out is a closed-form least-squares fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cnnkit.data import load_dataset
from cnnkit.lecture.exp_common import one_thread, table
from cnnkit.lecture.section import Section
from cnnkit.utils import write_json_atomic

KEY = "stride1_pooling"
SIZE = 18  # divisible by 2 and 3, so that stride-k pooling drops no row
VARIANTS = [("none", 1, 1), ("max 2x2, stride 1", 2, 1), ("max 2x2, stride 2", 2, 2),
            ("max 3x3, stride 1", 3, 1), ("max 3x3, stride 3", 3, 3)]
SHIFTS = [(0, 1), (0, -1), (1, 0), (-1, 0)]


def pool(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """Max pooling (N, 1, H, W); stride 1 pads with zeros (images are >= 0) so the map stays H x W."""
    if k == 1:
        return x
    if s == 1:
        x = F.pad(x, ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2))
    return F.max_pool2d(x, k, s)


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The image moved by (dy, dx) pixels, zeros coming in."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]


def invariance(x: torch.Tensor, k: int, s: int) -> tuple[float, float]:
    """(mean relative L2 change of the pooled map, fraction of unchanged units) over one-pixel moves."""
    base = pool(x, k, s).flatten(1)
    changes, unchanged = [], []
    for dy, dx in SHIFTS:
        moved = pool(shift(x, dy, dx), k, s).flatten(1)
        changes.append(((moved - base).norm(dim=1) / base.norm(dim=1).clamp_min(1e-12)).mean())
        unchanged.append(((moved - base).abs() < 1e-6).float().mean())
    return float(torch.stack(changes).mean()), float(torch.stack(unchanged).mean())


def linear_readout(train_x: torch.Tensor, test_x: torch.Tensor, k: int, s: int,
                   ridge: float = 1e-3) -> tuple[float, torch.Tensor]:
    """Held-out R^2 of the least-squares (ridge) linear map pooled map -> image, and its reconstructions."""
    def features(x):
        f = pool(x, k, s).flatten(1).double()
        return torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)

    a, b = features(train_x), train_x.flatten(1).double()
    gram = a.T @ a
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    w = torch.linalg.solve(gram, a.T @ b)
    target = test_x.flatten(1).double()
    recon = features(test_x) @ w
    r2 = 1 - float(((recon - target) ** 2).sum() / ((target - b.mean(0)) ** 2).sum())
    return r2, recon.float().view_as(test_x)


def positions_told_apart(k: int, s: int, size: int = SIZE) -> tuple[int, int]:
    """(distinct pooled maps, positions) over every position of one bright pixel on a blank image."""
    dots = torch.eye(size * size).view(-1, 1, size, size)
    maps = pool(dots, k, s).flatten(1)
    return len(torch.unique(maps, dim=0)), size * size


def build(out: Path, *, quick: bool, seed: int, progress: bool | None) -> Section:
    splits = load_dataset("digits", (SIZE, SIZE), seed=seed)
    train_x = torch.stack([x for x, _ in splits.train])
    test_x = torch.stack([x for x, _ in splits.val])
    rows, results, recons, told_apart = [], {}, {}, {}
    with one_thread():
        for name, k, s in VARIANTS:
            change, same = invariance(test_x, k, s)
            r2, recons[name] = linear_readout(train_x, test_x, k, s)
            told, positions = positions_told_apart(k, s)
            units = pool(test_x[:1], k, s).shape[-1] ** 2
            results[name] = (change, same, r2, told / positions)
            told_apart[name] = [told, positions]
            rows.append([name, units, change, same, r2, f"{told} / {positions}"])
    header = ["pooling", "units", "relative change, 1-px move", "units unchanged, 1-px move",
              "linear read-out R^2 (held-out)", "dot positions told apart"]
    write_json_atomic(out / "runs" / KEY / "results.json", {
        name: {"relative_change": r[0], "unchanged": r[1], "r2": r[2], "positions_told_apart": told_apart[name]}
        for name, r in results.items()})
    fig_maps, fig_trade = f"{KEY}_maps.png", f"{KEY}_tradeoff.png"
    _plot_maps(out / fig_maps, test_x, recons, results)
    _plot_tradeoff(out / fig_trade, results)
    none, s1, s2 = results["none"], results["max 2x2, stride 1"], results["max 2x2, stride 2"]
    t1, t3 = results["max 3x3, stride 1"], results["max 3x3, stride 3"]
    markdown = f"""The slide separates two things pooling does: it buys invariance ("useful if we care more about
whether some feature is present than exactly where it is"), and it loses information, "even if the
resolution is not reduced" (stride s = 1). Downsampling (stride s = k) is a separate choice, made for efficiency.

**What was run.** The {len(train_x) + len(test_x)} digits at {SIZE}x{SIZE} (upsampled from 8x8), max pooling over
2x2 and 3x3 windows with stride 1 (zero-padded: the map keeps the {SIZE}x{SIZE} size) and with stride k,
and no pooling. Invariance: the pooled map of each held-out digit against that of the digit moved by one
pixel (up, down, left, right), unit by unit. Information: a ridge least-squares linear map from the pooled
map back to the image, fitted on the {len(train_x)} training digits and scored (R^2) on the {len(test_x)}
held-out ones; and, for a single bright pixel at each of the {SIZE * SIZE} positions, how many positions
give different pooled maps.

{table(header, rows)}

![maps and reconstructions]({fig_maps})

![invariance vs information]({fig_trade})

**Result.** Pooling trades information for invariance, and stride 1 shows the trade without any loss of
resolution. A one-pixel move changes the unpooled image by {none[0]:.2f} (relative L2) but the 2x2 and
3x3 stride-1 maps only by {s1[0]:.2f} and {t1[0]:.2f} ({100 * s1[1]:.0f}% and {100 * t1[1]:.0f}% of their units
do not change at all, against {100 * none[1]:.0f}% of the pixels, the blank background).
The price: the image is no longer a linear function of the map: the
read-out leaves {100 * (1 - s1[2]):.1f}% and {100 * (1 - t1[2]):.1f}% of the pixel variance unexplained
(none without pooling), although the map has as many units as the image. Downsampling (stride k) gives
about the same invariance per unit ({s2[0]:.2f}, {t3[0]:.2f}) and loses more: {100 * (1 - s2[2]):.1f}% and
{100 * (1 - t3[2]):.1f}% unexplained. (The digits, upsampled from 8x8, are smooth, so every map keeps most
of them; the order is what matters.) Where exactly an isolated feature is survives stride-1 pooling (every
dot position has its own map) but not stride k, where only {100 * s2[3]:.0f}% (2x2) and {100 * t3[3]:.0f}%
(3x3) of the positions can be told apart.
"""
    return Section(key=KEY, title="Pooling without downsampling (stride s = 1)", markdown=markdown,
                   figures=[fig_maps, fig_trade], numbers=[], command=f"cnnkit lecture --only {KEY}")


def _plot_maps(path: Path, images, recons, results, index: int = 0) -> None:
    from cnnkit.train.plots import plt, save_figure

    fig, axes = plt.subplots(2, len(VARIANTS), figsize=(1.9 * len(VARIANTS), 4.2))
    for col, (name, k, s) in enumerate(VARIANTS):
        pooled = pool(images[index : index + 1], k, s)[0, 0]
        axes[0, col].imshow(pooled.numpy(), cmap="gray", vmin=0, vmax=1)
        axes[0, col].set_title(f"{name}\n{pooled.shape[0]}x{pooled.shape[1]}", fontsize=8)
        axes[1, col].imshow(recons[name][index, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1, col].set_title(f"read-out R^2 {results[name][2]:.3f}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("pooled map")
    axes[1, 0].set_ylabel("linear read-out")
    fig.suptitle("a held-out digit: its max-pooled maps and the image recovered linearly from them", fontsize=9)
    save_figure(fig, path)


def _plot_tradeoff(path: Path, results) -> None:
    from cnnkit.train.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for (name, k, s), marker in zip(VARIANTS, "osDo^"):
        change, _, r2, _ = results[name]
        ax.plot(change, r2, marker, markersize=8, color="tab:blue" if s == 1 and k > 1 else
                ("grey" if k == 1 else "tab:red"), label=name)
        ax.annotate(name, (change, r2), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set(xlabel="relative change of the map under a 1-pixel move (lower: more invariant)",
           ylabel="linear read-out R^2 (higher: less lost)", title="invariance vs information loss")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
