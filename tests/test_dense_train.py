"""Dense training: one backward pass over the dense output equals summing per-patch gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnkit.dense import densify, patch_by_patch
from cnnkit.dense.loss import IGNORE_INDEX, dense_loss, sample_pixel_mask
from cnnkit.errors import ConfigError
from cnnkit.models import create_patch_net


def test_masked_dense_loss_gradient_equals_sum_of_patch_gradients():
    """The paper's error-map mask: only selected pixels contribute; the gradient of the summed
    dense loss equals the sum of the per-patch cross-entropy gradients at those pixels."""
    torch.manual_seed(0)
    model, (patch, _) = create_patch_net("segment", num_classes=3, in_chans=2, width=2, patch=18)
    model = model.double().eval()
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 7, 6))
    target[0, 0, :3] = IGNORE_INDEX
    mask = torch.rand(2, 7, 6) < 0.5

    dense = densify(model, patch, border="replicate")
    params = list(model.parameters())
    g_dense = torch.autograd.grad(dense_loss(dense(x), target, mask, reduction="sum"), params)

    use = mask & (target != IGNORE_INDEX)
    n_idx, i_idx, j_idx = use.nonzero().unbind(1)
    total = 0
    for n in range(2):  # the slow twin: each selected pixel's patch through the patch net
        sel = n_idx == n
        pos = torch.stack([i_idx[sel], j_idx[sel]], 1)
        scores = patch_by_patch(model, x[n:n + 1], patch, border="replicate", pixels=pos)[0].T  # (M, K)
        total = total + F.cross_entropy(scores, target[n][pos[:, 0], pos[:, 1]], reduction="sum")
    g_patch = torch.autograd.grad(total, params)
    for a, b in zip(g_dense, g_patch):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_dense_loss_checks_shapes_and_means():
    scores = torch.randn(1, 3, 4, 5)
    target = torch.randint(0, 3, (1, 4, 5))
    with pytest.raises(ConfigError, match="mask of shape"):
        dense_loss(scores, target, torch.ones(4, 4))
    with pytest.raises(ConfigError, match="target of shape"):
        dense_loss(scores, target[:, :3])
    ref = F.cross_entropy(scores, target)
    torch.testing.assert_close(dense_loss(scores, target), ref)
    torch.testing.assert_close(dense_loss(scores, target, torch.ones(4, 5)), ref)


def test_sample_pixel_mask_is_balanced_and_skips_ignored():
    target = torch.zeros(20, 20, dtype=torch.long)
    target[:2, :5] = 1  # 10 positives among 400
    target[10:] = IGNORE_INDEX
    mask = sample_pixel_mask(target, 20, generator=torch.Generator().manual_seed(0))
    assert mask.sum() == 20
    assert (target[mask] == 1).sum() == 10 and (target[mask] == 0).sum() == 10
    assert not (target[mask] == IGNORE_INDEX).any()


@pytest.mark.parametrize("mode", ["dilated", "space_to_batch"])
def test_float32_fast_path_gradients(mode):
    """float64 runs the reproducible convolution; float32 runs oneDNN in both layouts: its
    backward pass must give the per-patch gradient sum too (to float32 accuracy)."""
    torch.manual_seed(1)
    model, (patch, _) = create_patch_net("segment", num_classes=2, in_chans=1, width=3, patch=16)
    model.eval()
    x = torch.randn(2, 1, 9, 10)
    w = torch.randn(2, 2, 9, 10)
    params = list(model.parameters())
    g_dense = torch.autograd.grad((densify(model, patch, mode=mode)(x) * w).sum(), params)
    g_patch = torch.autograd.grad((patch_by_patch(model, x, patch) * w).sum(), params)
    for a, b in zip(g_dense, g_patch):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


@pytest.mark.slow
def test_retaining_freed_memory_avoids_page_faults():
    """In a fresh process (the setting is process-wide): repeated dense passes fault every page of
    their maps above glibc's 32 MB mmap ceiling, and next to none once freed memory is retained."""
    import subprocess
    import sys

    code = """
import resource, sys, torch
from cnnkit.dense.allocator import retain_freed_memory
if sys.argv[1] == "1":
    assert retain_freed_memory()
from cnnkit.dense import densify
from cnnkit.models import create_patch_net
dense = densify(create_patch_net("descriptor")[0].eval(), 64, mode="dilated")
x = torch.randn(1, 1, 256, 256)  # the last maps are 128 x 295 x 295 floats: 44 MB
with torch.no_grad():
    dense(x), dense(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    dense(x), dense(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = [int(subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True,
                                 check=True).stdout) for flag in ("0", "1")]
    assert faults[0] > 20_000  # two passes, each several maps of 11k pages
    assert faults[1] < faults[0] / 4  # measured 0-12k against 118k
