"""Lecture figures on what a convolution commutes with (``cnnkit.analysis.equivariance``) and on computing
it in the frequency domain (``cnnkit.layers.fft_conv``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.analysis.equivariance import Rotation, Scaling, Translation, equivariance_error
from cnnkit.layers import fft_conv, gaussian_window
from cnnkit.lecture.fig_common import command, md_table
from cnnkit.lecture.section import Number, Section

# --------------------------------------------------------------------------- equivariance


def _conv(weight: torch.Tensor, padding_mode: str = "zeros") -> nn.Conv2d:
    k = weight.shape[-1]
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], k, padding=k // 2, bias=False,
                     padding_mode=padding_mode).double()
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


def equivariance_layers(seed: int) -> dict[str, nn.Module]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "random 5x5 filters": _conv(torch.randn(4, 1, 5, 5, generator=gen, dtype=torch.float64), "circular"),
        "isotropic 5x5 (Gaussian)": _conv(gaussian_window(5, 1.0, dtype=torch.float64)[None, None], "circular"),
        "1x1 (pointwise)": _conv(torch.randn(4, 1, 1, 1, generator=gen, dtype=torch.float64), "circular"),
    }


def smooth_image(seed: int) -> torch.Tensor:
    """(1, 1, 33, 33): a smooth random image (Gaussian-blurred noise), so that resampling is accurate."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, 41, 41, generator=gen, dtype=torch.float64)
    x = F.conv2d(x, gaussian_window(9, 1.5, dtype=torch.float64)[None, None])
    return x / x.std()


def build_equivariance(out: Path, *, quick: bool, seed: int, progress: bool | None = None) -> Section:
    from cnnkit.train.plots import plt, save_figure

    key = "equivariance"
    layers = equivariance_layers(seed)
    x = smooth_image(seed)
    axes_of = {
        "translation (pixels)": ([1, 2, 3, 5, 8] if quick else list(range(1, 11)), lambda v: Translation(v)),
        "rotation (degrees)": (list(range(0, 181, 30 if quick else 10)), lambda v: Rotation(v, margin=2)),
        "scale factor": ([0.6, 0.8, 1.0, 1.25, 1.6] if quick else [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4,
                                                                   1.6, 1.8, 2.0], lambda v: Scaling(v, margin=2)),
    }
    errors = {ax: {name: [equivariance_error(m, make(v), x) for v in values] for name, m in layers.items()}
              for ax, (values, make) in axes_of.items()}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    for ax, (label, (values, _)) in zip(axes, axes_of.items()):
        for (name, errs), style in zip(errors[label].items(), ("o-", "s--", "^:")):
            ax.plot(values, errs, style, label=name)
        ax.set(xlabel=label, ylim=(-0.02, 1.05))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_ylabel("||f(g x) - g f(x)|| / ||f(x)||")
    axes[0].set_title("translation (circular padding): exact", fontsize=10)
    axes[1].set_title("rotation", fontsize=10)
    axes[2].set_title("scaling", fontsize=10)
    fig.tight_layout()
    name = f"{key}.png"
    save_figure(fig, out / name)

    probes = [("translation by 3 px", Translation(3)), ("rotation by 90 degrees", Rotation(90)),
              ("rotation by 30 degrees", Rotation(30, margin=2)), ("scaling by 1.25", Scaling(1.25, margin=2))]
    table_rows = [[what, *(f"{equivariance_error(m, g, x):.3f}" for m in layers.values())] for what, g in probes]
    random = layers["random 5x5 filters"]
    t_err = max(errors["translation (pixels)"]["random 5x5 filters"])
    r_err = equivariance_error(random, Rotation(90), x)
    s_err = equivariance_error(random, Scaling(1.25, margin=2), x)
    numbers = [
        Number("convolution, translation: equivariance error (largest shift tried)", "equivariant",
               f"{t_err:.1e}", t_err < 1e-12, "circular padding, float64"),
        Number("convolution, rotation by 90 degrees: equivariance error", "not equivariant (the lecture's question)",
               f"{r_err:.2f}", r_err > 0.1, "random 5x5 filters; an isotropic filter gives ~0"),
        Number("convolution, scaling by 1.25: equivariance error", "not equivariant (the lecture's question)",
               f"{s_err:.2f}", s_err > 0.1, "random 5x5 filters; only 1x1 filters commute with resampling"),
    ]
    text = f"""The lecture: "Parameter sharing causes the layer to have equivariance to translation ... Is convolution
equivariant to changes in the scale or rotation?" `cnnkit.analysis.equivariance` measures
||f(g x) - g f(x)|| / ||f(x)|| for a convolution f and a transform g, on a smooth random 33x33 image (compared
on the central disc that both sides see, away from the padding).

{md_table(["transform g", *layers], table_rows)}

`{name}`: the error as the shift, the angle and the scale grow. Translation: exactly 0 (circular padding; with
zero padding only near the border). Rotation and scale: no, for filters in general - rotating the input is the
same as convolving with the counter-rotated filter, which the layer does not have. Only an isotropic filter
commutes with rotation (to the bilinear-resampling floor off the 90-degree grid), and only a 1x1 filter with
scaling; invariance to them needs pooling over transformed filters (see the learned-invariance section) or an
image pyramid.
"""
    return Section(key, "Is convolution equivariant to changes in the scale or rotation?", text, [name], numbers,
                   command(key))


# --------------------------------------------------------------------------- FFT convolution


def best_seconds(fn, reps: int) -> float:
    """The fastest of ``reps`` timed calls after a warm-up: on a shared machine the minimum is the run
    least disturbed by other jobs (a median still moves with them)."""
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def fft_timings(quick: bool, seed: int) -> tuple[dict, list[dict]]:
    """Direct (F.conv2d) vs FFT convolution time per kernel size, same-size output, float32, one thread."""
    setup = {"batch": 2, "channels": 8, "side": 64, "reps": 5} if quick else \
        {"batch": 2, "channels": 16, "side": 96, "reps": 5}
    kernels = list(range(3, 28, 4)) if quick else list(range(3, 32, 4))
    gen = torch.Generator().manual_seed(seed)
    b, c, h = setup["batch"], setup["channels"], setup["side"]
    x = torch.randn(b, c, h, h, generator=gen)
    rows = []
    with torch.no_grad():
        for k in kernels:
            w = torch.randn(c, c, k, k, generator=gen) / k
            direct = F.conv2d(x, w, padding=k // 2)
            diff = float((fft_conv(x, w, padding=k // 2) - direct).abs().max() / direct.abs().max())
            t_direct = best_seconds(lambda: F.conv2d(x, w, padding=k // 2), setup["reps"])  # noqa: B023
            t_fft = best_seconds(lambda: fft_conv(x, w, padding=k // 2), setup["reps"])  # noqa: B023
            rows.append({"kernel": k, "direct_ms": 1e3 * t_direct, "fft_ms": 1e3 * t_fft, "rel_diff": diff})
    return setup, rows


def crossover(rows: list[dict]) -> int | None:
    """The smallest kernel from which the FFT is faster at every larger size tried."""
    wins = [r["fft_ms"] < r["direct_ms"] for r in rows]
    return next((r["kernel"] for i, r in enumerate(rows) if all(wins[i:])), None)


def build_fft(out: Path, *, quick: bool, seed: int, progress: bool | None = None) -> Section:
    from cnnkit.train.plots import plt, save_figure

    key = "fft"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the comparison should not depend on what else runs
    try:
        setup, rows = fft_timings(quick, seed)
    finally:
        torch.set_num_threads(threads)
    cross = crossover(rows)
    ks = [r["kernel"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    ax.plot(ks, [r["direct_ms"] for r in rows], "o-", label="direct (F.conv2d)")
    ax.plot(ks, [r["fft_ms"] for r in rows], "s-", label="FFT (cnnkit.layers.fft_conv)")
    if cross is not None:
        ax.axvline(cross, color="gray", ls=":", label=f"FFT faster from k = {cross}")
    ax.set(xlabel="kernel size k (k x k)", ylabel="forward time (ms, best of runs)", yscale="log",
           title=f"batch {setup['batch']}, {setup['channels']}->{setup['channels']} channels, "
                 f"{setup['side']}x{setup['side']} maps, 1 thread")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    name = f"{key}.png"
    save_figure(fig, out / name)
    worst = max(r["rel_diff"] for r in rows)
    table = md_table(["kernel", "direct ms", "FFT ms", "direct / FFT", "relative max difference"],
                     [[f"{r['kernel']}x{r['kernel']}", f"{r['direct_ms']:.1f}", f"{r['fft_ms']:.1f}",
                       f"{r['direct_ms'] / r['fft_ms']:.2f}", f"{r['rel_diff']:.1e}"] for r in rows])
    verdict = f"from k = {cross} on" if cross else "not within the sizes tried"
    numbers = [
        Number("FFT convolution equals direct convolution (largest relative difference)", "convolution theorem",
               f"{worst:.1e}", worst < 1e-4, "float32"),
        Number("kernel size from which the FFT is faster (this machine, 1 thread)", "(question only)",
               str(cross) if cross else "none", None, "a timing: depends on the machine and the map size"),
    ]
    text = f"""The lecture asks "Can we apply CNN in frequency domain?" Yes: by the convolution theorem a
correlation is a pointwise product of spectra, and `cnnkit.layers.fft_conv` computes exactly what `F.conv2d`
does (largest relative difference {worst:.1e} in float32). What changes is the cost: direct convolution grows
with the kernel area, k^2 per output, while the FFT's cost hardly depends on k (Mathieu, Henaff, LeCun, ICLR 2014).

`{name}`: forward time against k on this machine (fastest of {setup['reps']} runs, one thread). The FFT is faster
{verdict}. Small kernels (3x3, 5x5: what the lecture's nets use after the first layer) favour direct
convolution, which is why the frequency domain pays off mainly for large kernels or large maps.

{table}
"""
    return Section(key, "Can we apply CNN in frequency domain?", text, [name], numbers, command(key))
