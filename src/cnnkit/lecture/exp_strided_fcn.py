"""Section "strided_fcn": "Down-sampling due to greater-than-1 strides" (Kang and Wang, arXiv:1411.4464)
against the d-regularly sparse kernels of Li, Zhao and Wang (arXiv:1412.4526).

The patch classifier of "direct_maps" (``cnnkit.lecture.exp_shapes``) is run on whole images two ways:

- as a plain fully convolutional net: FC layers turned into convolutions (``linear_to_conv``, the
  lecture's "C x M x M kernels"), every stride kept. Its output is down-sampled by the total stride
  (4): output (i, j) is the patch classifier on the patch centred on pixel (4i, 4j). It is brought
  back to the image size by nearest-neighbour or bilinear interpolation between those centres;
- exactly densely (``cnnkit.dense.densify``, Algorithm 1 of the lecture): every pixel's own score.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.dense import pad_image, patch_by_patch
from cnnkit.lecture import exp_shapes as shp
from cnnkit.lecture.exp_common import one_thread, table
from cnnkit.lecture.section import Section
from cnnkit.models.base import linear_to_conv
from cnnkit.utils import write_json_atomic

KEY = "strided_fcn"
BAND = 2  # pixels within this distance of an object's boundary count as "near the boundary"


def strided_fcn(model: nn.Sequential, patch: int) -> nn.Sequential:
    """The patch classifier with Flatten dropped and each Linear made a convolution (the first reads the
    C x M x M map of one patch; later ones are 1 x 1), strides kept: (N, C, H, W) -> (N, K, h, w)."""
    layers, shape = nn.Sequential(), None
    x = torch.zeros(1, 1, patch, patch)
    for name, m in model.named_children():
        if isinstance(m, nn.Flatten):
            shape = tuple(x.shape[1:])  # (C, M, M) that the first FC layer reads
            continue
        if isinstance(m, nn.Linear):
            m = linear_to_conv(m, shape)
            shape = (m.out_channels, 1, 1)
        elif shape is None:
            with torch.no_grad():
                x = m(x)
        layers.add_module(name, m)
    return layers.eval()


def upsample(coarse: torch.Tensor, stride: int, size: int, mode: str) -> torch.Tensor:
    """Scores at pixels 0, s, 2s, ... (N, K, h, w) -> (N, K, size, size): ``nearest`` takes the closest
    computed centre, ``bilinear`` interpolates between centres (past the last one: its value)."""
    h = coarse.shape[-1]
    if mode == "nearest":
        index = torch.clamp(torch.round(torch.arange(size) / stride).long(), max=h - 1)
        return coarse[:, :, index][:, :, :, index]
    span = stride * (h - 1) + 1
    fine = F.interpolate(coarse, size=(span, span), mode="bilinear", align_corners=True)
    return F.pad(fine, (0, size - span, 0, size - span), mode="replicate")


def near_boundary(target: torch.Tensor, band: int = BAND) -> torch.Tensor:
    """Pixels whose (2 band + 1)-square neighbourhood holds both classes."""
    t = target[:, None].float()
    grown = F.max_pool2d(t, 2 * band + 1, 1, band)
    shrunk = -F.max_pool2d(-t, 2 * band + 1, 1, band)
    return (grown != shrunk)[:, 0]


def build(out: Path, *, quick: bool, seed: int, progress: bool | None) -> Section:
    images, target = shp.shapes(64 if quick else 256, seed + 2, shp.TRAIN_COLUMNS)
    size, p, s = shp.SIZE, shp.PATCH, shp.TOTAL_STRIDE
    with one_thread():
        model, _ = shp.trained_patch_net(out, quick=quick, seed=seed, progress=progress)
        fcn, dense = strided_fcn(model, p), shp.dense(model)
        with torch.no_grad():
            padded = pad_image(images, (p, p), "replicate")
            exact = shp.predict_scores(dense, images)  # warm-up and result
            t0 = time.perf_counter()
            exact = shp.predict_scores(dense, images)
            t_exact = time.perf_counter() - t0
            fcn(padded[:4])  # warm-up
            t0 = time.perf_counter()
            coarse = torch.cat([fcn(padded[i : i + 64]) for i in range(0, len(images), 64)])
            maps = {mode: upsample(coarse, s, size, mode) for mode in ("nearest", "bilinear")}
            t_fcn = time.perf_counter() - t0
            # the slow twin: every pixel's own patch, on the first image
            t0 = time.perf_counter()
            reference = patch_by_patch(model, images[:1], p, border="replicate")
            t_patch = time.perf_counter() - t0
    diff_coarse = float((coarse - exact[:, :, ::s, ::s]).abs().max())  # the FCN computes exact at the centres
    near = near_boundary(target)
    fcn_size = f"{coarse.shape[-2]}x{coarse.shape[-1]} -> {size}x{size}"
    outputs = {"strided FCN, nearest": (maps["nearest"], fcn_size, t_fcn),
               "strided FCN, bilinear": (maps["bilinear"], fcn_size, t_fcn),
               "exact dense (d-regularly sparse)": (exact, f"{size}x{size}", t_exact)}
    rows, accuracy, diff = [], {}, {}
    for name, (scores, shape, seconds) in outputs.items():
        pred = scores.argmax(1)
        right = pred == target
        accuracy[name] = (float(right.float().mean()), float(right[near].float().mean()))
        diff[name] = float((scores[:1] - reference).abs().max())
        rows.append([name, shape, f"{diff[name]:.1e}", *accuracy[name], shp.scores_metrics(pred, target)["iou"],
                     f"{1000 * seconds / len(images):.2f}"])
    rows.append(["patch by patch", f"{size}x{size}", "0", "", "", "", f"{1000 * t_patch:.2f}"])
    header = ["output", "output size", "max abs difference to patch by patch (image 1, all pixels)",
              "pixel accuracy", f"accuracy within {BAND} px of a boundary", "object IoU", "ms per image"]
    write_json_atomic(out / "runs" / KEY / "results.json", {
        "coarse_size": list(coarse.shape[-2:]), "exact_size": list(exact.shape[-2:]),
        "max_abs_diff_to_patch_by_patch": diff, "max_abs_diff_fcn_vs_exact_at_centres": diff_coarse,
        "accuracy": {k: {"all": a, "near_boundary": b} for k, (a, b) in accuracy.items()},
        "seconds_per_image": {k: v[2] / len(images) for k, v in outputs.items()} | {"patch by patch": t_patch}})
    figure = f"{KEY}_maps.png"
    _plot(out / figure, images, target, coarse, maps, exact, s)
    markdown = f"""A patch classifier can be applied to a whole image as a fully convolutional network (Kang and Wang,
arXiv:1411.4464): convolution and pooling kernels slide over the image and each FC layer becomes a
convolution ("C x M x M kernels"). But "the output of fully convolutional network is down-sampled due to
the greater-than-1 strides in convolution and pooling layers". Li, Zhao and Wang (arXiv:1412.4526)
remove the down-sampling with d-regularly sparse kernels: exactly the patch-by-patch result, at every pixel.

**What was run.** The `segment` patch classifier of the section "direct_maps" (20x20 patches, two 2x2/2
max-pools: total stride {s}) on {len(images)} new 32x32 shape images, (1) as a plain FCN with its FC
layers converted and strides kept, its {coarse.shape[-2]}x{coarse.shape[-1]} output brought to 32x32 by
nearest-neighbour or bilinear interpolation between the pixels it was computed at (every {s}th), and
(2) densified (`cnnkit.dense.densify`, the lecture's Algorithm 1). The image is padded by replicating
its border in both, as in `patch_by_patch`.

{table(header, rows)}

Checks: the exact dense scores equal patch by patch (every pixel's own 20x20 patch through the patch
classifier, all 1024 pixels of the first image) to {diff['exact dense (d-regularly sparse)']:.1e} (float32
rounding); the strided FCN's outputs equal the exact ones at the pixels they stand for (every {s}th row and
column, all images) to {diff_coarse:.1e}. The FCN is not wrong, only sparse: it computes 1 pixel in {s * s},
and the interpolated scores in between differ from the true ones by up to
{max(diff['strided FCN, nearest'], diff['strided FCN, bilinear']):.1f} (class scores before the softmax).

![coarse vs exact]({figure})

**Result.** Up-sampling the strided output costs accuracy where labels change: within {BAND} pixels of an
object's boundary the accuracy is {accuracy['strided FCN, nearest'][1]:.3f} (nearest) and
{accuracy['strided FCN, bilinear'][1]:.3f} (bilinear) against {accuracy['exact dense (d-regularly sparse)'][1]:.3f}
exactly dense; over all pixels {accuracy['strided FCN, nearest'][0]:.3f} / {accuracy['strided FCN, bilinear'][0]:.3f}
against {accuracy['exact dense (d-regularly sparse)'][0]:.3f}. Object interiors and background, far from a
boundary, come out right either way. The strided net computes fewer positions after each pooling (1/4
after the first, 1/{s * s} after the second), so it is somewhat faster; the d-regularly sparse kernels
compute every pixel while sharing all intermediate results, far faster than cropping each pixel's patch
(times above: one thread; patch by patch timed on one image).
"""
    return Section(key=KEY, title="Down-sampling due to greater-than-1 strides", markdown=markdown,
                   figures=[figure], numbers=[], command=f"cnnkit lecture --only {KEY}")


def _plot(path: Path, images, target, coarse, maps, exact, stride: int, examples: int = 2) -> None:
    from cnnkit.train.plots import plt, save_figure

    prob = {"coarse output (8x8)": coarse.softmax(1)[:, 1], "nearest": maps["nearest"].softmax(1)[:, 1],
            "bilinear": maps["bilinear"].softmax(1)[:, 1], "exact dense": exact.softmax(1)[:, 1]}
    columns = ["image", "truth", *prob]
    fig, axes = plt.subplots(examples, len(columns), figsize=(1.6 * len(columns), 1.8 * examples), squeeze=False)
    for i in range(examples):
        pictures = [images[i, 0], target[i].float(), *(p[i] for p in prob.values())]
        for k, (ax, pic) in enumerate(zip(axes[i], pictures)):
            # the coarse map's cell (i, j) is drawn centred on pixel (s i, s j), the centre it was computed at
            lo, hi = -stride / 2, stride * pic.shape[-1] - stride / 2
            extent = (lo, hi, hi, lo) if k == 2 else None
            ax.imshow(pic.numpy(), cmap="gray", vmin=None if k == 0 else 0, vmax=None if k == 0 else 1, extent=extent)
            ax.set(xlim=(-0.5, images.shape[-1] - 0.5), ylim=(images.shape[-2] - 0.5, -0.5), facecolor="black")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[k], fontsize=8)
    fig.suptitle("P(object): strided fully convolutional output vs exact dense output", fontsize=9)
    save_figure(fig, path)
