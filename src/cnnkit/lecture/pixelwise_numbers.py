"""The lecture's pixelwise part in numbers: FC layers as convolutions, and the speed-up of one dense pass.

"Convert FC layers to convolution layers": an FC layer after a C x M x M map becomes N kernels of
C x M x M; after another FC layer, N kernels of M x 1 x 1. cnnkit's ``fully_convolutional`` does this
to AlexNet (built on the meta device) and the kernel shapes are read off the result.

"Generates exactly the same results as patch-by-patch ... speeds up the computation more than 1,500X"
(Li, Zhao, Wang 2014): measured here on Bailer et al.'s descriptor net (64 x 64 patches) on this
machine's CPU. Patch by patch on every pixel would take minutes to hours, so its time per pixel is
measured on a random sample of pixels and multiplied out (the cost per patch does not depend on
where the patch is); the dense pass runs on the whole image and is checked against the sample.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cnnkit.lecture.section import Number, Section
from cnnkit.lecture.zoo_numbers import build_meta, table


def fc_to_conv_numbers() -> list[Number]:
    from cnnkit.models.base import fully_convolutional

    fcn = fully_convolutional(build_meta("alexnet"), (3, 227, 227))
    convs = {name.rsplit(".", 1)[-1]: m for name, m in fcn.named_modules() if isinstance(m, torch.nn.Conv2d)}
    rows = []
    for name, printed_kernel, printed_n, rule in (("fc6", "256x6x6", 4096, "after a pooling layer: C x M x M"),
                                                   ("fc7", "4096x1x1", 4096, "after another FC layer: M x 1 x 1"),
                                                   ("fc8", "4096x1x1", 1000, "after another FC layer: M x 1 x 1")):
        conv = convs[name]
        kernel = "x".join(map(str, conv.weight.shape[1:]))
        rows.append(Number(f"AlexNet {name} as convolution: kernel ({rule})", printed_kernel, kernel,
                           kernel == printed_kernel))
        rows.append(Number(f"AlexNet {name} as convolution: number of kernels (N)", str(printed_n),
                           str(conv.out_channels), conv.out_channels == printed_n))
    return rows


def speedup(out: Path, *, quick: bool, seed: int, progress=None) -> Section:
    from cnnkit.dense import densify, patch_by_patch
    from cnnkit.models import create

    torch.manual_seed(seed)
    h, w = (192, 256) if quick else (720, 1080)
    sample = 256 if quick else 2048
    model = create("descriptor").eval()
    image = torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(seed))
    dense = densify(model, 64, mode="dilated")
    with torch.inference_mode():
        dense(image[:, :, :64, :64])  # warm-up
        t0 = time.perf_counter()
        full = dense(image)
        t_dense = time.perf_counter() - t0
        g = torch.Generator().manual_seed(seed + 1)
        pixels = torch.stack([torch.randint(0, h, (sample,), generator=g),
                              torch.randint(0, w, (sample,), generator=g)], 1)  # (sample, 2)
        patch_by_patch(model, image, 64, pixels=pixels[:32])  # warm-up
        t0 = time.perf_counter()
        ref = patch_by_patch(model, image, 64, pixels=pixels)
        t_patch = (time.perf_counter() - t0) / sample * h * w
    err = (full[0][:, pixels[:, 0], pixels[:, 1]] - ref[0]).abs().max().item()
    ratio = t_patch / t_dense
    rows = fc_to_conv_numbers()
    rows.append(Number(f"dense vs patch-by-patch speed-up (descriptor net, {w}x{h}, CPU)", "more than 1,500X",
                       f"{ratio:,.0f}x", None,
                       f"dense {t_dense:.2f} s; patch by patch {t_patch:,.0f} s extrapolated from {sample:,} "
                       "sampled pixels; the paper's figure is for its nets and images on a GPU, and the ratio grows "
                       "with the image"))
    rows.append(Number("dense == patch by patch on the sampled pixels (max |difference|)", "exactly the same",
                       f"{err:.1e}", err < 1e-4, "float32"))
    text = (__doc__.split("\n\n", 1)[1] + "\n" + table(rows) + "\nRun `python benchmarks/dense.py` for the "
            "side-by-side benchmark with FLOP rates and memory.\n")
    return Section("pixelwise", "Fully convolutional networks with no down-sampling", text, numbers=rows,
                   command="cnnkit densify --net descriptor --check --size 720x1080")
