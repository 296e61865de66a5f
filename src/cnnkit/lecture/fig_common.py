"""What the figure sections of the lecture report share: kernel grids, probing a dense step's kernel,
markdown tables and the run folder of a section.

The sections themselves are in ``fig_dense`` (d-regularly sparse kernels, the toy example),
``fig_geometry`` (receptive fields, learned invariance, equivariance, FFT) and ``fig_learned``
(filters, the studies). matplotlib is imported inside the drawing functions (Agg, files only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cnnkit.analysis.study import markdown_table
from cnnkit.dense.graph import SpatialStep


def command(key: str) -> str:
    return f"cnnkit lecture --only {key}"


def runs_folder(out: Path, key: str) -> Path:
    """Where a section's training runs live: ``out/runs/<key>/``."""
    return Path(out) / "runs" / key


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table of cells written as ``str`` gives them (the studies' table, without its newline)."""
    return markdown_table([str(h) for h in header], [[str(c) for c in r] for r in rows]).rstrip("\n")


def spatial_steps(dense) -> dict[str, SpatialStep]:
    """The sliding-window steps of a ``densify`` net by layer name (conv1, pool1, ...)."""
    return {(node.target if node.op == "call_module" else node.name): step
            for node, step in dense.core.steps if isinstance(step, SpatialStep)}


def probe_kernel(step: SpatialStep) -> np.ndarray:
    """The d-regularly sparse kernel a dense step applies, read off the step itself.

    The step's kernel is run (stride 1, taps ``step.dilation`` apart, exactly as the dense net runs
    it) on one unit impulse per position of its dilated window; the single output value each impulse
    produces is the kernel entry at that position. A convolution (bias 0) returns its weight at a
    tap and 0 between taps; a max-pooling returns 1 where the window reads and 0 where it does not.
    """
    kernel = step.make((), {})
    d = step.dilation
    span = [dd * (k - 1) + 1 for dd, k in zip(d, step.kernel_size)]
    n = span[0] * span[1]
    weight = getattr(kernel, "weight", None)
    dtype = weight.dtype if weight is not None else torch.float64
    impulses = torch.eye(n, dtype=dtype).reshape(n, 1, *span)  # (n, 1, h, w): one impulse each
    with torch.no_grad():
        if weight is not None:  # probe input channel 0 -> output channel 0, without the bias
            bias = kernel.bias
            kernel.bias = None
            try:
                x = torch.zeros(n, weight.shape[1], *span, dtype=dtype)
                x[:, :1] = impulses
                y = kernel.run(x, d)[:, 0]  # (n, 1, 1)
            finally:
                kernel.bias = bias
        else:
            y = kernel.run(impulses, d)[:, 0]
    return y.reshape(*span).detach().cpu().numpy()


def draw_grid(ax, values: np.ndarray, title: str, *, labels: np.ndarray | None = None, fmt: str = "{:.2g}",
              cmap: str = "Blues") -> None:
    """A kernel as a grid of cells: zero cells light grey with a '0', non-zero cells coloured and labelled."""
    values = np.asarray(values, dtype=float)
    h, w = values.shape
    nz = values != 0
    top = float(np.abs(values).max()) or 1.0
    rgb = np.ones((h, w, 3)) * 0.93
    import matplotlib

    colours = matplotlib.colormaps[cmap]
    for i in range(h):
        for j in range(w):
            if nz[i, j]:
                rgb[i, j] = colours(0.3 + 0.35 * abs(values[i, j]) / top)[:3]
    ax.imshow(rgb, interpolation="nearest")
    for i in range(h):
        for j in range(w):
            text = labels[i, j] if labels is not None else (fmt.format(values[i, j]) if nz[i, j] else "0")
            ax.text(j, i, text, ha="center", va="center", fontsize=9 if max(h, w) <= 7 else 7,
                    color="black" if nz[i, j] else "0.55")
    ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
    ax.grid(which="minor", color="0.4", lw=0.8)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(title, fontsize=10)


def tap_labels(values: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Labels for a sparse kernel's non-zero cells in reading order (w1, w2, ...), '0' elsewhere."""
    labels = np.full(values.shape, "0", dtype=object)
    it = iter(names)
    for idx in zip(*np.nonzero(values)):
        labels[idx] = next(it, "?")
    return labels
