"""The slow, obvious twin of the dense net: crop the patch around every pixel and classify it.

Patches are gathered in batches from a strided view of the padded image (``Tensor.unfold``
without materialising all patches), with the same border and centring rule as ``densify``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm.auto import tqdm

from cnnkit.dense.ops import preferred_format
from cnnkit.dense.tiling import pad_image
from cnnkit.errors import ConfigError


def patch_by_patch(model: nn.Module, image: torch.Tensor, patch_size, batch_size: int = 256,
                   border: str = "zeros", pixels: torch.Tensor | None = None,
                   progress: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Run ``model`` on the patch around each pixel of ``image`` (N, C, *L).

    Returns (N, K, *L); with ``pixels`` (an (M, nd) tensor of positions) only those, as (N, K, M).
    The model runs as it is (call ``model.eval()`` first to compare with a dense net).
    ``batch_size`` patches go through the model at a time, bounding memory. ``channels_last``
    hands the model NHWC patches (oneDNN's fast path; the model must not ``view`` its maps).
    """
    nd = image.dim() - 2
    patch = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (int(patch_size),) * nd
    if len(patch) != nd:
        raise ConfigError(f"patch_size {patch_size!r} does not match a {nd}-D image")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    size = tuple(image.shape[2:])
    n, c = image.shape[:2]
    xp = pad_image(image, patch, border)
    # (N, C, *L, *P): every patch as a view, nothing copied yet
    view = xp
    for axis, p in enumerate(patch):
        view = view.unfold(2 + axis, p, 1)
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    view = view.permute(perm)  # (N, *L, C, *P)
    if pixels is None:
        grid = torch.meshgrid(*(torch.arange(s) for s in size), indexing="ij")
        pos = torch.stack([g.reshape(-1) for g in grid], dim=1)
    else:
        pos = torch.as_tensor(pixels, dtype=torch.long).reshape(-1, nd).cpu()
        for axis, s in enumerate(size):
            if pos.numel() and (pos[:, axis].min() < 0 or pos[:, axis].max() >= s):
                raise ConfigError(f"pixels outside the {size} image")
    m = pos.shape[0]
    pos = pos.to(image.device)
    # one flat list of (image, position) pairs, image-major
    img_idx = torch.arange(n, device=image.device).repeat_interleave(m)
    pos_all = pos.repeat(n, 1)
    outs = []
    bar = tqdm(range(0, n * m, batch_size), desc="patches", unit="batch",
               disable=not (progress and sys.stderr.isatty()))
    for start in bar:
        sl = slice(start, start + batch_size)
        index = (img_idx[sl], *pos_all[sl].unbind(1))
        patches = view[index]  # (B, C, *P), gathered into a new tensor
        patches = patches.contiguous(memory_format=preferred_format(patches) if channels_last
                                     else torch.contiguous_format)
        out = model(patches)
        outs.append(out.reshape(out.shape[0], -1))
    scores = torch.cat(outs)  # (N * M, K)
    k = scores.shape[1]
    scores = scores.view(n, m, k).transpose(1, 2)  # (N, K, M)
    if pixels is None:
        scores = scores.reshape(n, k, *size)
    assert c == image.shape[1]
    return scores
