"""Lecture figures of the last part (Li, Zhao, Wang, arXiv:1412.4526): d-regularly sparse kernels and
the toy example, drawn from what ``cnnkit.dense.densify`` itself builds and runs.

Every kernel drawn here is read off the converted network's own steps (``fig_common.probe_kernel``:
unit impulses through the step's kernel, run as the dense net runs it), not drawn by hand.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.dense import densify, pad_image
from cnnkit.lecture.fig_common import command, draw_grid, md_table, probe_kernel, spatial_steps, tap_labels
from cnnkit.lecture.section import Number, Section
from cnnkit.models import create_patch_net

LECTURE_D = [1, 1, 2, 2, 6]  # the lecture's toy example: d used to convert conv1, pool1, conv2, pool2, conv3


def zero_inserted(kernel: np.ndarray, d: int) -> np.ndarray:
    """The lecture's d-regularly sparse kernel written out: d - 1 zero rows/columns between the taps."""
    k = kernel.shape[0]
    out = np.zeros((d * (k - 1) + 1,) * 2)
    out[::d, ::d] = kernel
    return out


def sparse_pair(d: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(3x3 convolution kernel, 2x2 pooling kernel) as the dense engine converts them at accumulated stride d.

    The carrier net puts them behind a d x d / d pooling, so that Algorithm 1 reaches them with
    ``d``: pool d/d -> conv 3x3 -> pool 2x2/2, patch 4d x 4d (4d -> 4 -> 2 -> 1). The conv weights
    are 1..9 so that each tap can be followed to its place in the sparse kernel.
    """
    conv = nn.Conv2d(1, 1, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 10.0).view(1, 1, 3, 3))
        conv.bias.zero_()
    net = nn.Sequential(nn.MaxPool2d(d, d), conv, nn.MaxPool2d(2, 2), nn.Flatten()).double().eval()
    steps = spatial_steps(densify(net, 4 * d, mode="dilated"))
    conv_step, pool_step = steps["1"], steps["2"]
    return probe_kernel(conv_step), probe_kernel(pool_step), (conv_step.dilation[0], pool_step.dilation[0])


def build_sparse_kernels(out: Path, *, quick: bool, seed: int, progress: bool | None = None) -> Section:
    from cnnkit.train.plots import plt, save_figure

    key = "sparse_kernels"
    ds = (2, 3)
    fig, axes = plt.subplots(2, 1 + len(ds), figsize=(3.2 * (1 + len(ds)), 6.4),
                             gridspec_kw={"width_ratios": [3] + [2 * d + 1 for d in ds]})
    numbers = []
    dilations = {}
    for col, d in enumerate((1, *ds)):
        conv_k, pool_k, dil = sparse_pair(d)
        dilations[d] = dil
        names = [f"w{i}" for i in range(1, 10)]
        size = f"{conv_k.shape[0]}x{conv_k.shape[1]}"
        title = "3x3 convolution\nkernel (d = 1)" if d == 1 else f"converted, d = {d}: {size}"
        draw_grid(axes[0][col], conv_k, title, labels=tap_labels(conv_k, names))
        size = f"{pool_k.shape[0]}x{pool_k.shape[1]}"
        title = "2x2 pooling\nkernel (d = 1)" if d == 1 else f"converted, d = {d}: {size}"
        draw_grid(axes[1][col], pool_k, title, labels=tap_labels(pool_k, ["1"] * 4), cmap="Oranges")
        if d > 1:
            numbers.append(Number(f"3x3 conv and 2x2 pooling kernels converted at d = {d}",
                                  "all-zero rows and columns inserted between the taps",
                                  f"{conv_k.shape[0]}x{conv_k.shape[1]} and {pool_k.shape[0]}x{pool_k.shape[1]}, "
                                  f"{int((conv_k != 0).sum())} and {int((pool_k != 0).sum())} non-zero cells",
                                  bool(np.array_equal(conv_k, zero_inserted(np.arange(1.0, 10.0).reshape(3, 3), d))
                                       and np.array_equal(pool_k, zero_inserted(np.ones((2, 2)), d))),
                                  "compared with the kernel with d - 1 zeros inserted between taps"))
    fig.suptitle("d-regularly sparse kernels: all-zero rows and columns inserted between the taps "
                 "(read off cnnkit.dense's converted layers)", fontsize=10)
    fig.tight_layout()
    name = f"{key}.png"
    save_figure(fig, out / name)
    text = f"""The lecture: "d of original dense kernels is 1. Insert all-zero rows and columns to create
d-regularly sparse kernels." With every stride set to 1, a layer that the patch net reaches after an
accumulated stride d must read its input d pixels apart, so its kernel is spread out with d - 1 zero
rows and columns between neighbouring taps (Li, Zhao, Wang, arXiv:1412.4526).

`{name}`: top row, a 3x3 convolution kernel (taps w1..w9) as given and as converted for d = 2
(5x5) and d = 3 (7x7); bottom row, a 2x2 max-pooling kernel and its conversions (3x3, 4x4). The
kernels are not drawn by hand: a carrier net (pool d/d, conv 3x3, pool 2x2/2) is converted by
`cnnkit.dense.densify`, and each converted layer is run, as the dense net runs it, on one unit impulse
per position of its window; a cell shows the output for the impulse there (grey 0: the layer does
not read that pixel). The engine gave the conv and pool layers dilations
{', '.join(f'{dilations[d][0]} and {dilations[d][1]} (d = {d})' for d in (1, *ds))}.
"""
    return Section(key, "d-regularly convolution and pooling kernels", text, [name], numbers, command(key))


# --------------------------------------------------------------------------- the toy example


def toy_trace(seed: int = 0):
    """The lecture's toy net (width 1, float64), its dense twin, and Algorithm 1's trace per layer."""
    torch.manual_seed(seed)
    model, patch = create_patch_net("toy", num_classes=1, in_chans=1, width=1)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    model = model.double().eval()
    dense = densify(model, patch, mode="dilated")
    rows = []
    for row in dense.layers():
        if "dilation" not in row:
            continue
        m = getattr(model, row["name"])
        k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        s = m.stride if isinstance(m.stride, int) else m.stride[0]
        rows.append({"layer": row["name"], "kernel": k, "stride": s, "d": row["dilation"][0]})
    return model, patch, dense, rows


def build_toy_example(out: Path, *, quick: bool, seed: int, progress: bool | None = None) -> Section:
    from cnnkit.train.plots import plt, save_figure

    key = "toy_example"
    model, patch, dense, rows = toy_trace(seed)
    steps = spatial_steps(dense)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, 5, 5, generator=gen, dtype=torch.float64)
    padded = pad_image(x, patch)  # (1, 1, 19, 19): 7 zeros before and after
    t0 = time.perf_counter()
    with torch.no_grad():
        out_dense = dense(x)  # (1, 1, 5, 5): one score per input pixel
        ref_top_left = model(padded[:, :, :15, :15])[0, 0]
        ref_all = torch.stack([torch.stack([model(padded[:, :, i:i + 15, j:j + 15])[0, 0] for j in range(5)])
                               for i in range(5)])
    diff_tl = float((out_dense[0, 0, 0, 0] - ref_top_left).abs())
    diff_all = float((out_dense[0, 0] - ref_all).abs().max())
    seconds = time.perf_counter() - t0

    # figure 1: the original and the proposed (converted) pool2 and conv3, and the padded input
    pool2_orig = np.ones((3, 3))
    conv3_orig = model.conv3.weight.detach()[0, 0].numpy()
    pool2_new, conv3_new = probe_kernel(steps["pool2"]), probe_kernel(steps["conv3"])
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.9), gridspec_kw={"width_ratios": [9, 3, 5, 2, 7]})
    ax = axes[0]
    ax.imshow(padded[0, 0].numpy(), cmap="gray", interpolation="nearest")
    ax.add_patch(plt.Rectangle((-0.5, -0.5), 15, 15, fill=False, ec="tab:red", lw=2))
    ax.add_patch(plt.Rectangle((6.5, 6.5), 5, 5, fill=False, ec="tab:blue", lw=1.5, ls="--"))
    ax.set_title("5x5 input padded to 19x19\nred: the 15x15 top-left patch; blue: the input", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    draw_grid(axes[1], pool2_orig, "original pool2\n3x3 / 3", labels=np.full((3, 3), "1"), cmap="Oranges")
    draw_grid(axes[2], pool2_new, f"proposed pool2\nd = {steps['pool2'].dilation[0]}, stride 1",
              labels=tap_labels(pool2_new, ["1"] * 9), cmap="Oranges")
    draw_grid(axes[3], conv3_orig, "original conv3\n2x2 / 1", fmt="{:.2f}")
    draw_grid(axes[4], conv3_new, f"proposed conv3\nd = {steps['conv3'].dilation[0]}, stride 1", fmt="{:.2f}")
    fig.tight_layout()
    kernels_png = f"{key}_kernels.png"
    save_figure(fig, out / kernels_png)

    # figure 2: the dense output map beside the patch-by-patch one
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    lo, hi = float(ref_all.min()), float(ref_all.max())
    for ax, data, title in ((axes[0], out_dense[0, 0], "dense net on the 5x5 input (one pass)"),
                            (axes[1], ref_all, "patch net on each 15x15 patch")):
        im = ax.imshow(data.numpy(), cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        ax.add_patch(plt.Rectangle((-0.5, -0.5), 1, 1, fill=False, ec="tab:red", lw=2))
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    im = axes[2].imshow((out_dense[0, 0] - ref_all).abs().numpy(), cmap="magma", interpolation="nearest")
    axes[2].set_title(f"|difference| (max {diff_all:.1e}, float64)", fontsize=9, pad=14)
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.set_xticks(range(5))
        ax.set_yticks(range(5))
    fig.tight_layout()
    check_png = f"{key}_check.png"
    save_figure(fig, out / check_png)

    ds = [r["d"] for r in rows]
    table = md_table(["layer", "kernel", "stride d_k", "d used to convert it", "d after the layer"],
                     [[r["layer"], f"{r['kernel']}x{r['kernel']}", r["stride"], r["d"], r["d"] * r["stride"]]
                      for r in rows])
    numbers = [
        Number("Algorithm 1's d for conv1, pool1, conv2, pool2, conv3", "1, 1, 2, 2, 6", ", ".join(map(str, ds)),
               ds == LECTURE_D, "dilations of the layers cnnkit.dense.densify built"),
        Number("dense output at the top-left vs the patch net on the 15x15 top-left patch (max |diff|)",
               "exactly the same results", f"{diff_tl:.1e}", diff_tl < 1e-12, "float64"),
        Number("dense vs patch-by-patch over all 25 pixels (max |diff|)", "exactly the same results",
               f"{diff_all:.1e}", diff_all < 1e-12, "float64"),
        Number("padded input size", "19x19", "x".join(map(str, padded.shape[2:])),
               tuple(padded.shape[2:]) == (19, 19)),
    ]
    text = f"""The lecture's toy example: a 15x15 patch net (conv1 2x2/1, pool1 2x2/2, conv2 2x2/1, pool2 3x3/3,
conv3 2x2/1; one map per layer here, weights drawn at random) is converted by Algorithm 1: every stride
set to 1, each kernel made d-regularly sparse with the accumulated stride d, then d <- d x d_k.
Trace of the conversion, as `cnnkit.dense.densify` did it (d read off the converted layers):

{table}

`{kernels_png}`: the 5x5 input zero-padded to 19x19 with the 15x15 top-left patch the lecture compares;
original vs proposed pool2 (3x3 -> 5x5, d = 2) and conv3 (2x2 -> 7x7, d = 6), the proposed kernels read off
the dense net's layers by unit impulses. `{check_png}`: the dense net's 5x5 output (one pass over the
padded image) beside the patch net run on each of the 25 patches; at the top-left pixel the difference is
{diff_tl:.1e}, over all 25 pixels at most {diff_all:.1e} (float64; {seconds * 1000:.0f} ms for both).
"""
    return Section(key, "A toy example", text, [kernels_png, check_png], numbers, command(key))
