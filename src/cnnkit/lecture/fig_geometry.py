"""Lecture figures about where a unit looks and what it is invariant to: receptive fields (summary),
pooling over rotated filters (ChannelMaxPool), equivariance of convolution (analysis.equivariance)
and convolution in the frequency domain (layers.fft_conv). No training: each runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.analysis.equivariance import Rotation
from cnnkit.analysis.summary import summary
from cnnkit.layers import ChannelMaxPool
from cnnkit.lecture.fig_common import command, md_table
from cnnkit.lecture.section import Number, Section
from cnnkit.models import create, model_info

# --------------------------------------------------------------------------- receptive fields


def stage_rows(name: str) -> list[tuple[str, str, int, int]]:
    """(layer, kernel, receptive field, total stride) after every conv and pooling layer of ``name``."""
    with torch.device("meta"):  # no weights allocated: the geometry needs shapes only
        model = create(name)
    rows = summary(model, model_info(name).input_size).rows
    return [(r.name.rsplit(".", 1)[-1], r.kernel, r.receptive_field[0], r.total_stride[0])
            for r in rows if r.kernel and r.receptive_field]


def build_receptive_fields(out: Path, *, quick: bool, seed: int, progress: bool | None = None) -> Section:
    from cnnkit.train.plots import plt, save_figure

    key = "receptive_fields"
    nets = {"lenet5": "LeNet-5", "alexnet": "AlexNet"}
    stages = {n: stage_rows(n) for n in nets}
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
    cmap = plt.get_cmap("plasma")
    for ax, (name, label) in zip(axes, nets.items()):
        side = model_info(name).input_size[-1]
        rows = stages[name]
        ax.add_patch(plt.Rectangle((0, 0), side, side, fc="0.92", ec="black"))
        c = side / 2
        for i, (layer, kernel, rf, stride) in enumerate(rows):
            colour = cmap(0.85 * i / max(1, len(rows) - 1))
            shown = min(rf, side)  # a window larger than the input is drawn clipped, labelled in full
            ax.add_patch(plt.Rectangle((c - shown / 2, c - shown / 2), shown, shown, fill=False, ec=colour, lw=2,
                                       ls="-" if rf <= side else "--",
                                       label=f"{layer} ({kernel}): {rf}x{rf}, stride {stride}"))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="layer: window, stride",
                  title_fontsize=7)
        ax.set(xlim=(-2, side + 2), ylim=(side + 2, -2), aspect="equal",
               title=f"{label}: one unit's window in the {side}x{side} input")
        ax.set_xticks([0, side])
        ax.set_yticks([0, side])
    fig.tight_layout()
    name_png = f"{key}.png"
    save_figure(fig, out / name_png)
    tables = "\n\n".join(f"{nets[n]} (input {model_info(n).input_size[-1]}x{model_info(n).input_size[-1]}):\n\n"
                         + md_table(["layer", "kernel/stride", "receptive field", "total stride"],
                                    [[layer, k, f"{rf}x{rf}", s] for layer, k, rf, s in stages[n]])
                         for n in nets)
    first = {n: stages[n][0] for n in nets}
    numbers = [Number(f"{nets[n]}: receptive field of a first-layer unit", "equal to size of filter",
                      f"{first[n][2]}x{first[n][2]} ({first[n][1]} filter)",
                      first[n][2] == int(first[n][1].split("x")[0]))
               for n in nets]
    last = stages["alexnet"][-1]
    numbers.append(Number("AlexNet pool5: receptive field, total stride", "a larger neighborhood",
                          f"{last[2]}x{last[2]}, {last[3]}", None, "computed by cnnkit.analysis.summary"))
    text = f"""The lecture (after Ranzato, CVPR'13): "A hidden unit in the first hidden layer is influenced by a small
neighborhood (equal to size of filter). A hidden unit after the pooling layer is influenced by a larger
neighborhood (it depends on filter sizes and the sizes of pooling regions)", and after a few stages the
unit sees almost the whole image. `cnnkit.analysis.summary` follows (receptive field r, total stride j)
through every layer: a k x k layer of stride s maps (r, j) to (r + (k - 1) j, j s).

`{name_png}`: the window one unit of each stage sees, nested over the input (dashed: larger than the
input, clipped; the unit then also sees padding).

{tables}
"""
    return Section(key, "A hidden unit is influenced by a larger neighborhood", text, [name_png], numbers,
                   command(key))


# --------------------------------------------------------------------------- learned invariance


def digit_images(label: int, size: int) -> torch.Tensor:
    """scikit-learn's 8x8 digits of one class, bilinearly resized to size x size, (N, 1, size, size) float64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[d.target == label] / 16.0, dtype=torch.float64)[:, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def build_learned_invariance(out: Path, *, quick: bool, seed: int, progress: bool | None = None) -> Section:
    from cnnkit.train.plots import plt, save_figure

    key = "learned_invariance"
    copies = 8 if quick else 16
    fives = digit_images(5, 15)
    template = fives[1:].mean(0, keepdim=True)  # (1, 1, 15, 15): the mean "5", the first one held out
    template = template - template.mean()
    template = template / template.norm()
    bank = torch.cat([Rotation(360 * r / copies)(template) for r in range(copies)])  # (R, 1, 15, 15)
    conv = nn.Conv2d(1, copies, 15, padding=7, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(bank)
    pooled = nn.Sequential(conv, ChannelMaxPool(copies))  # the pooling unit over the R filters

    def scene(digit: torch.Tensor) -> torch.Tensor:
        canvas = torch.zeros(1, 1, 41, 41, dtype=torch.float64)
        canvas[..., 13:28, 13:28] = digit
        return canvas

    angles = list(range(0, 361, 30 if quick else 10))
    probe = scene(fives[:1])  # a held-out 5, not part of the template
    single, pooled_r = [], []
    with torch.no_grad():
        for a in angles:
            turned = Rotation(a)(probe)
            single.append(float(conv(turned)[:, 0].amax()))
            pooled_r.append(float(pooled(turned).amax()))
    top = max(pooled_r)
    single_n, pooled_n = (np.array(v) / top for v in (single, pooled_r))

    fig = plt.figure(figsize=(12, 4.4))
    cols = 4  # the filters as a 4-column block (2 rows for 8 copies, 4 for 16)
    grid = fig.add_gridspec(copies // cols, cols + 6)
    for r in range(copies):
        ax = fig.add_subplot(grid[r // cols, r % cols])
        ax.imshow(bank[r, 0].numpy(), cmap="gray", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            ax.set_title("filter 1 (upright)", fontsize=7)
    ax = fig.add_subplot(grid[:, cols + 1:])
    ax.plot(angles, pooled_n, "o-", label=f"max-pool over the {copies} rotated filters")
    ax.plot(angles, single_n, "s--", label="the single upright filter")
    ax.set(xlabel="rotation of the input 5 (degrees)", ylabel="response (max over positions)",
           xticks=range(0, 361, 45), ylim=(min(0, float(single_n.min())) - 0.05, 1.1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Learned invariance: a unit pooling over rotated copies of a '5' template", fontsize=10)
    name = f"{key}.png"
    save_figure(fig, out / name)
    flat, single_flat = float(pooled_n.min() / pooled_n.max()), float(single_n.min() / single_n.max())
    numbers = [
        Number("pooled unit: weakest / strongest response of a 5 over all rotations",
               "detects 5s in any rotation", f"{flat:.2f} (single filter: {single_flat:.2f})",
               flat > 0.7 and flat > single_flat + 0.2,
               f"{copies} copies {360 // copies} degrees apart; in between the unit interpolates"),
    ]
    text = f"""The lecture (after Bengio et al., Deep Learning): "If we pool over the outputs of separately
parameterized convolutions, the features can learn which transformations to become invariant to ... By
learning to have each filter be a different rotation of the '5' template, this pooling unit has learned to
be invariant to rotation."

Here the filters are set rather than learned: the template is the mean of scikit-learn's 5s (15x15, zero
mean, unit norm) and the bank its {copies} rotations, {360 // copies} degrees apart; `cnnkit.layers.ChannelMaxPool`
takes the max over them at each position. `{name}`: the filters (left) and the response (max over positions)
to a held-out 5 turned through 360 degrees (right), as a fraction of the pooled unit's strongest response.
The pooled unit keeps {100 * flat:.0f}% of its response at the worst angle; the single upright filter drops to
{100 * single_flat:.0f}%: translation invariance comes from pooling over positions of one filter, rotation
invariance from pooling over rotated filters. (The single filter recovers near 180 degrees because a 5 is
nearly point-symmetric: turned half-way it still looks much like a 5.)
"""
    return Section(key, "Example of learned invariances", text, [name], numbers, command(key))
