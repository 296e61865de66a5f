"""Pictures of what a network learned: filters, feature maps, receptive fields, dense predictions.

- :func:`filter_grid`: the first layer's kernels as a grid, as the lecture's figure of the 96
  learned low-level filters of Krizhevsky et al. (2012): each filter contrast-normalised on its own
  (min -> black, max -> white), shown in colour when it reads 3 input channels.
- :func:`plot_feature_maps`: the maps a layer computes for one image ("multiple filters generate
  multiple feature maps").
- :func:`receptive_field`: the input window a unit sees ("a hidden node at a higher layer has a
  larger receptive field in the input"), computed exactly from kernel, stride, padding and dilation
  of every layer below it; :func:`plot_receptive_field` draws it on the image together with the
  gradient of the unit with respect to the input (the part of the window that matters for this image).
- :func:`plot_dense_prediction`: the fully convolutional form of a classifier (FC layers as
  convolutions) run on a larger image gives a map of class scores; its argmax is drawn over the image.

Every PNG is written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.analysis.common import check_layer, checkpoint_splits, load_images, save_png
from cnnkit.data.images import open_image
from cnnkit.errors import ConfigError, UnsupportedLayerError
from cnnkit.models import extract_features

# Layers that keep every position where it is (no spatial extent).
POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Dropout2d, nn.Identity,
             nn.BatchNorm2d, nn.LocalResponseNorm)
SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def contrast_normalise(x: torch.Tensor) -> torch.Tensor:
    """Each item of a (N, ...) stack scaled to [0, 1] on its own; a constant item becomes 0.5."""
    flat = x.detach().float().flatten(1)  # (N, D)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.full_like(flat, 0.5))
    return out.reshape(x.shape)


def grid_columns(n: int) -> int:
    """Columns for n tiles: fewest empty slots, then the shape closest to 4:3 (96 -> 12 x 8, as the
    lecture's figure of AlexNet's filters; 16 -> 4 x 4)."""
    candidates = range(max(1, math.isqrt(n - 1) + 1 if n > 1 else 1), math.isqrt(2 * n) + 2)
    return min(candidates, key=lambda c: (math.ceil(n / c) * c - n, abs(c / math.ceil(n / c) - 4 / 3)))


def mosaic(tiles: torch.Tensor, *, columns: int | None = None, scale: int = 1, pad: int = 1,
           background: float = 1.0) -> np.ndarray:
    """(N, C, h, w) tiles in [0, 1] (C = 1 or 3) as one uint8 grid image, each pixel ``scale`` x ``scale``."""
    n, c, h, w = tiles.shape
    columns = columns or grid_columns(n)
    rows = math.ceil(n / columns)
    canvas = torch.full((3, pad + rows * (h + pad), pad + columns * (w + pad)), background)
    for i in range(n):
        y, x = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        canvas[:, y:y + h, x:x + w] = tiles[i].expand(3, -1, -1) if c == 1 else tiles[i]
    array = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()  # (H, W, 3)
    return array.repeat(scale, 0).repeat(scale, 1)


def show_image(ax, image: torch.Tensor, **kw) -> None:
    """A (C, H, W) image in [0, 1] on matplotlib axes: colour for 3 channels, grey otherwise."""
    image = image.detach().float().cpu().clamp(0, 1)
    if image.shape[0] == 3:
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest", **kw)
    else:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", **kw)


# --------------------------------------------------------------------------- filters and maps


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ConfigError("the model has no Conv2d layer, so no filters to show")


def filter_grid(weight: torch.Tensor, *, scale: int | None = None) -> np.ndarray:
    """(O, I, k, k) kernels -> grid image; RGB for I = 3, the mean over inputs otherwise (I = 1: as is)."""
    w = weight.detach().float().cpu()
    if w.shape[1] != 3:
        w = w.mean(1, keepdim=True)  # (O, 1, k, k)
    tiles = contrast_normalise(w)
    scale = scale or max(1, 48 // max(w.shape[-2:]))  # kernels of any size about 48 px wide
    return mosaic(tiles, scale=scale, pad=1)


def plot_filters(model: nn.Module, path: str | Path) -> dict:
    name, conv = first_conv(model)
    save_png(path, filter_grid(conv.weight))
    return {"layer": name.rsplit(".", 1)[-1], "filters": conv.out_channels, "kernel": list(conv.kernel_size),
            "in_channels": conv.in_channels, "png": str(path)}


def plot_feature_maps(model: nn.Module, image: torch.Tensor, layer: str, path: str | Path, *,
                      mean: torch.Tensor | None = None, max_maps: int = 64) -> dict:
    """The input (left) and up to ``max_maps`` maps of ``layer`` (right), each map contrast-normalised."""
    from cnnkit.train.plots import plt, save_figure

    maps = _forward_to(model, image, layer, mean)[0]  # (C, h, w)
    if maps.dim() != 3:
        raise ConfigError(f"layer {layer!r} outputs a vector of {maps.numel()} values, not feature maps; "
                          "choose a convolution or pooling layer")
    shown = maps[:max_maps]
    grid = mosaic(contrast_normalise(shown)[:, None], scale=max(1, 48 // max(maps.shape[-2:])), pad=1)
    fig, (ax_in, ax_maps) = plt.subplots(1, 2, figsize=(11, 5), gridspec_kw={"width_ratios": [1, 2.2]})
    show_image(ax_in, image)
    ax_in.set_title(f"input {image.shape[-2]}x{image.shape[-1]}")
    ax_maps.imshow(grid, interpolation="nearest")
    ax_maps.set_title(f"{layer}: {len(shown)} of {maps.shape[0]} maps, {maps.shape[1]}x{maps.shape[2]} each")
    for ax in (ax_in, ax_maps):
        ax.axis("off")
    save_figure(fig, Path(path))
    return {"layer": layer, "maps": maps.shape[0], "size": list(maps.shape[1:]), "png": str(path)}


def _forward_to(model: nn.Module, image: torch.Tensor, layer: str, mean: torch.Tensor | None) -> torch.Tensor:
    param = next(model.parameters())
    x = image[None].to(param.device, param.dtype)
    if mean is not None:
        x = x - mean.to(param.device, param.dtype)
    model.eval()
    with torch.no_grad():
        return extract_features(model, x, [layer])[layer].float().cpu()


# --------------------------------------------------------------------------- receptive fields


def _modules_up_to(model: nn.Module, layer: str) -> list[tuple[str, nn.Module]]:
    """Leaf modules in order up to and including ``layer`` (full or short name)."""
    leaves = [(n, m) for n, m in model.named_modules() if n and next(m.children(), None) is None]
    for i, (name, _) in enumerate(leaves):
        if layer in (name, name.rsplit(".", 1)[-1]):
            return leaves[: i + 1]
    raise ConfigError(f"model has no layer named {layer!r}; layers: "
                      f"{', '.join(n.rsplit('.', 1)[-1] for n, _ in leaves)}")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def receptive_field(model: nn.Module, layer: str, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[int, ...]:
    """Input box (top, bottom, left, right), inclusive, seen by the units rows x cols (inclusive) of ``layer``.

    Walks the layers from ``layer`` down to the input: output positions [a, b] of a layer with kernel
    k, stride s, padding p and dilation d read inputs [a*s - p, b*s - p + (k-1)*d]. Exact for conv
    and pooling (floor or ceil mode); the box may extend past the image into the padding.
    """
    (top, bottom), (left, right) = rows, cols
    for name, m in reversed(_modules_up_to(model, layer)):
        if isinstance(m, POINTWISE) or type(m).__name__ == "LocalResponseNorm":
            continue
        if isinstance(m, (nn.Linear, nn.Flatten)):
            raise UnsupportedLayerError(f"layer {layer!r} comes after the fully connected part ({name}): its units "
                                        "see the whole input; choose a convolution or pooling layer")
        if not isinstance(m, SPATIAL):
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(m).__name__}) has no receptive-field rule; choose a layer before it "
                "(convolution, pooling or pointwise layers only)")
        k, s, p = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
        d = _pair(getattr(m, "dilation", 1)) if not isinstance(m, nn.AvgPool2d) else (1, 1)
        if isinstance(p[0], str):
            raise UnsupportedLayerError(f"layer {name!r} uses padding={m.padding!r}; give numeric padding")
        top, bottom = top * s[0] - p[0], bottom * s[0] - p[0] + (k[0] - 1) * d[0]
        left, right = left * s[1] - p[1], right * s[1] - p[1] + (k[1] - 1) * d[1]
    return top, bottom, left, right


def input_gradient(model: nn.Module, image: torch.Tensor, layer: str, unit: tuple[int, int, int], *,
                   mean: torch.Tensor | None = None) -> torch.Tensor:
    """d(unit)/d(input) as an (H, W) map (summed over channels) for one image; ``unit`` = (c, y, x)."""
    param = next(model.parameters())
    x = image[None].to(param.device, param.dtype).clone().requires_grad_(True)
    model.eval()
    inp = x - mean.to(param.device, param.dtype) if mean is not None else x
    out = extract_features(model, inp, [layer])[layer]  # (1, C, h, w)
    c, y, xx = unit
    if out.dim() != 4 or not (0 <= c < out.shape[1] and 0 <= y < out.shape[2] and 0 <= xx < out.shape[3]):
        raise ConfigError(f"unit {unit} is outside layer {layer!r} of shape {tuple(out.shape[1:])}; "
                          "give --unit C,Y,X within it")
    (grad,) = torch.autograd.grad(out[0, c, y, xx], x)
    return grad[0].sum(0).detach().cpu()


def plot_receptive_field(model: nn.Module, image: torch.Tensor, layer: str, path: str | Path, *,
                         unit: tuple[int, int, int] | None = None, mean: torch.Tensor | None = None) -> dict:
    """The image with the receptive field of one unit of ``layer`` drawn as a rectangle, and |gradient|
    of that unit with respect to the input overlaid. Default unit: the most active one for this image."""
    from matplotlib.patches import Rectangle

    from cnnkit.train.plots import plt, save_figure

    maps = _forward_to(model, image, layer, mean)[0]
    if maps.dim() != 3:
        raise ConfigError(f"layer {layer!r} is fully connected: its units see the whole input; "
                          "choose a convolution or pooling layer")
    if unit is None:
        c, rest = divmod(int(maps.argmax()), maps.shape[1] * maps.shape[2])
        unit = (c, *divmod(rest, maps.shape[2]))
    grad = input_gradient(model, image, layer, unit, mean=mean)
    top, bottom, left, right = receptive_field(model, layer, (unit[1], unit[1]), (unit[2], unit[2]))
    h, w = image.shape[-2:]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    for ax in axes:
        show_image(ax, image)
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1, fill=False,
                               edgecolor="yellow", linewidth=2))
        ax.set(xlim=(-0.5, w - 0.5), ylim=(h - 0.5, -0.5))
        ax.axis("off")
    magnitude = grad.abs()
    heat = (magnitude / magnitude.max().clamp_min(1e-12)).numpy()
    axes[1].imshow(heat, cmap="magma", alpha=0.7, interpolation="nearest")
    size = (bottom - top + 1, right - left + 1)
    axes[0].set_title(f"{layer} unit (c={unit[0]}, y={unit[1]}, x={unit[2]}): receptive field {size[0]}x{size[1]}")
    axes[1].set_title("|d unit / d input| (inside the field only)")
    save_figure(fig, Path(path))
    support = torch.nonzero(magnitude > 0)
    return {"layer": layer, "unit": list(unit), "box": [top, bottom, left, right], "size": list(size),
            "gradient_support": support.min(0).values.tolist() + support.max(0).values.tolist()
            if len(support) else [], "png": str(path)}


# --------------------------------------------------------------------------- dense predictions


MEAN_MODES = ("channel", "tile")


def dense_mean(mean: torch.Tensor, size: tuple[int, int], mode: str = "channel") -> torch.Tensor:
    """What to subtract from a larger image, given the (C, h, w) training mean image.

    No choice is exact for every window. "channel": each channel's mean value (no artefacts);
    "tile": the mean image repeated from the top-left corner, exact for the windows at multiples of
    the input size (e.g. an image made of input-sized tiles) and shifted for the others.
    """
    if mode == "channel":
        return mean.mean(dim=(1, 2), keepdim=True)
    if mode == "tile":
        reps = (1, -(-size[0] // mean.shape[1]), -(-size[1] // mean.shape[2]))
        return mean.repeat(*reps)[:, : size[0], : size[1]]
    raise ConfigError(f"unknown mean mode {mode!r}; use one of {', '.join(MEAN_MODES)}")


def dense_scores(model: nn.Module, image: torch.Tensor, *, mean: torch.Tensor | None = None,
                 mean_mode: str = "channel") -> torch.Tensor:
    """(K, h, w) class posteriors of the fully convolutional form of ``model`` on a (C, H, W) image."""
    if not hasattr(model, "to_fully_convolutional"):
        raise ConfigError(f"{type(model).__name__} has no fully convolutional form; use a zoo classifier")
    param = next(model.parameters())
    fcn = model.to_fully_convolutional().eval()
    x = image[None].to(param.device, param.dtype)
    if mean is not None:
        x = x - dense_mean(mean, tuple(x.shape[-2:]), mean_mode).to(param.device, param.dtype)
    if x.shape[-2] < model.input_size[1] or x.shape[-1] < model.input_size[2]:
        raise ConfigError(f"image {tuple(x.shape[-2:])} is smaller than the network's input "
                          f"{tuple(model.input_size[1:])}; pass a larger image")
    with torch.no_grad():
        return fcn(x)[0].softmax(0).cpu()  # (K, h, w)


def score_window(model: nn.Module, i: int, j: int) -> tuple[int, int, int, int]:
    """Input box (top, bottom, left, right) read by score-map position (i, j): the union of the last
    feature map's M x M positions that the first FC layer (now an M x M convolution) reads."""
    last = [n for n, c in model.features.named_modules() if n and next(c.children(), None) is None][-1]
    param = next(model.parameters())
    with torch.no_grad():
        m = model.features(torch.zeros(1, *model.input_size, device=param.device, dtype=param.dtype)).shape[-1]
    return receptive_field(model.features, last, (i, i + m - 1), (j, j + m - 1))


def plot_dense_prediction(model: nn.Module, image: torch.Tensor, classes: list[str], path: str | Path, *,
                          mean: torch.Tensor | None = None, mean_mode: str = "channel",
                          marks: list[tuple[int, int]] | None = None, title: str = "") -> dict:
    """Argmax of the dense score map as coloured squares (one per score position, centred on the
    window it classifies, stride-sized), opacity by confidence, over the image. Score positions in
    ``marks`` get their predicted class written on them."""
    from matplotlib.patches import Patch

    from cnnkit.train.plots import plt, save_figure

    scores = dense_scores(model, image, mean=mean, mean_mode=mean_mode)
    conf, label = scores.max(0)  # (h, w)
    top0, bottom0, left0, right0 = score_window(model, 0, 0)
    top1, _, left1, _ = score_window(model, 1, 1)
    stride = (top1 - top0, left1 - left0)
    h, w = image.shape[-2:]
    palette = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    overlay = np.zeros((h, w, 4))
    for i in range(label.shape[0]):
        for j in range(label.shape[1]):
            cy = top0 + i * stride[0] + (bottom0 - top0) / 2
            cx = left0 + j * stride[1] + (right0 - left0) / 2
            y0, x0 = max(0, round(cy - stride[0] / 2)), max(0, round(cx - stride[1] / 2))
            overlay[y0:y0 + stride[0], x0:x0 + stride[1]] = (*palette(int(label[i, j]) % palette.N)[:3],
                                                             0.75 * float(conf[i, j]))
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    show_image(ax, image, alpha=0.9)
    ax.imshow(overlay, interpolation="nearest")
    for i, j in marks or []:
        cy = top0 + i * stride[0] + (bottom0 - top0) / 2
        cx = left0 + j * stride[1] + (right0 - left0) / 2
        ax.text(cx - 0.5, cy - 0.5, classes[int(label[i, j])], color="white", fontsize=9, fontweight="bold",
                ha="center", va="center", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "lw": 0})
    present = sorted(set(label.flatten().tolist()))
    ax.legend(handles=[Patch(color=palette(c % palette.N), label=classes[c]) for c in present],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="argmax")
    ax.set_title(title or f"dense predictions: {label.shape[0]}x{label.shape[1]} windows of "
                 f"{model.input_size[1]}x{model.input_size[2]}, stride {stride[0]}")
    ax.axis("off")
    save_figure(fig, Path(path))
    return {"score_map": list(label.shape), "stride": list(stride), "png": str(path),
            "labels": label.tolist()}


def tile_images(images: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, C, H, W) -> one (C, rows*H, cols*W) image, row by row."""
    n, c, h, w = images.shape
    grid = images[: rows * cols].reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4)  # (C, rows, H, cols, W)
    return grid.reshape(c, rows * h, cols * w)


# --------------------------------------------------------------------------- all of it, for a checkpoint

PARTS = ("filters", "maps", "rf", "dense")


def default_map_layer(model: nn.Module) -> str:
    """The last convolution whose maps are at least 3 x 3 at the native input size (else the first one)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: shapes.__setitem__(n, tuple(out.shape)))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *model.input_size, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
    if not shapes:
        raise ConfigError("the model has no Conv2d layer; pass --layer NAME")
    big = [n for n, s in shapes.items() if min(s[-2:]) >= 3]
    return (big or list(shapes))[-1].rsplit(".", 1)[-1]


def render_all(checkpoint, out, *, parts=PARTS, layer: str | None = None, image: Path | None = None,
               index: int = 0, unit=None, dense_image: Path | None = None, dense_grid: int = 3,
               dense_mean: str | None = None, data: str | None = None, device: str = "auto") -> dict:
    """The pictures ``parts`` of a checkpoint in folder ``out``; returns {part: details}."""
    from cnnkit.data import load_image
    from cnnkit.train.checkpoint import load_checkpoint
    from cnnkit.utils import ensure_writable_dir, resolve_device

    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ConfigError(f"unknown picture {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(PARTS)}")
    out = ensure_writable_dir(out)
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model().to(resolve_device(device)).eval()
    mean = ckpt.mean_image
    layer = check_layer(model, layer) if layer else default_map_layer(model)
    splits = None
    if image is None or ("dense" in parts and dense_image is None):
        splits = checkpoint_splits(ckpt, data)
    if image is not None:
        picture = load_images([image], ckpt)[0]
    else:
        if not 0 <= index < len(splits.val):
            raise ConfigError(f"--index {index} is outside the held-out split (0..{len(splits.val) - 1})")
        picture = splits.val[index][0]
    results = {}
    if "filters" in parts:
        results["filters"] = plot_filters(model, out / "filters.png")
    if "maps" in parts:
        results["maps"] = plot_feature_maps(model, picture, layer, out / "maps.png", mean=mean)
    if "rf" in parts:
        results["rf"] = plot_receptive_field(model, picture, layer, out / "rf.png", unit=unit, mean=mean)
    if "dense" in parts:
        if dense_image is not None:
            from PIL import ImageOps

            try:
                with open_image(dense_image) as im:
                    w, h = ImageOps.exif_transpose(im).size
            except OSError:
                w, h = 1, 1  # load_image below reports the error
            big = load_image(dense_image, channels=ckpt.meta.get("channels", 3), size=(h, w))
            results["dense"] = plot_dense_prediction(model, big, ckpt.classes, out / "dense.png", mean=mean,
                                                     mean_mode=dense_mean or "channel")
        else:
            if dense_grid < 2:
                raise ConfigError(f"--dense-grid must be at least 2, got {dense_grid}")
            n = min(dense_grid * dense_grid, len(splits.val))
            side = math.isqrt(n)
            tiles = torch.stack([splits.val[i][0] for i in range(side * side)])
            truth = [ckpt.classes[splits.val[i][1]] for i in range(side * side)]
            big = tile_images(tiles, side, side)
            # score positions whose window is exactly one tile: every (input size / stride)-th
            stride = _score_stride(model)
            step = model.input_size[1] // stride
            exact = model.input_size[1] % stride == 0 and model.input_size[1] == model.input_size[2]
            marks = [(r * step, c * step) for r in range(side) for c in range(side)] if exact else None
            rows = " / ".join(" ".join(truth[r * side:(r + 1) * side]) for r in range(side))
            results["dense"] = plot_dense_prediction(
                model, big, ckpt.classes, out / "dense.png", mean=mean, mean_mode=dense_mean or "tile", marks=marks,
                title=f"dense argmax on {side}x{side} held-out images (true: {rows}); labels: windows on one image")
    return results


def _score_stride(model: nn.Module) -> int:
    top0, _, _, _ = score_window(model, 0, 0)
    top1, _, _, _ = score_window(model, 1, 1)
    return top1 - top0
