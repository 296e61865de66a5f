"""Local contrast normalisation (Jarrett et al. 2009) against a loop over positions and window taps."""

import itertools

import pytest
import torch

from cnnkit.errors import ConfigError
from cnnkit.layers import LocalContrastNorm1d, LocalContrastNorm2d, gaussian_window, local_contrast_norm
from helpers import values_and_grads


def loop_lcn(x, window, across_channels, c, padding, dilation, eps=1e-6):
    """Jarrett's two passes, position by position: v = x - m_N(x), y = v / max(c, sqrt(m_N(v^2)))."""
    B, C, H, W = x.shape
    kh, kw = window.shape
    w = window / window.sum()
    span = [(k - 1) * dilation + 1 for k in (kh, kw)]
    left = [(s - 1) // 2 for s in span]

    def neighbourhood_mean(t, i, j):
        """Weighted mean over the taps of N(i, j) inside t (a dict of positions); re-normalised at borders."""
        total, weight = 0.0, 0.0
        for a, b in itertools.product(range(kh), range(kw)):
            pos = (i - left[0] + a * dilation, j - left[1] + b * dilation)
            if pos in t:
                tap = t[pos].mean(dim=1, keepdim=True) if across_channels else t[pos]  # (B, 1 or C)
                total, weight = total + w[a, b] * tap, weight + w[a, b]
        return total / weight

    def grid(shrink):  # positions whose neighbourhood lies inside (valid) or all positions (same)
        lo = [left[0] * shrink, left[1] * shrink]
        hi = [H - (span[0] - 1 - left[0]) * shrink, W - (span[1] - 1 - left[1]) * shrink]
        positions = [(i, j) for i in range(lo[0], hi[0]) for j in range(lo[1], hi[1])]
        return positions, hi[0] - lo[0], hi[1] - lo[1]

    valid = padding == "valid"
    first, _, _ = grid(1 if valid else 0)
    second, oh, ow = grid(2 if valid else 0)
    xs = {(i, j): x[:, :, i, j] for i in range(H) for j in range(W)}
    v = {p: xs[p] - neighbourhood_mean(xs, *p) for p in first}
    sigma = {p: neighbourhood_mean({q: t * t for q, t in v.items()}, *p).sqrt() for p in second}
    if c == "mean":
        c_value = torch.stack(list(sigma.values())).mean(dim=0)  # per image (and map), over positions
    else:
        c_value = torch.tensor(float(c), dtype=x.dtype)
    out = [v[p] / torch.maximum(torch.maximum(sigma[p], c_value), torch.tensor(eps, dtype=x.dtype))
           for p in second]
    return torch.stack(out, dim=-1).view(B, C, oh, ow)



@pytest.mark.parametrize("kernel,across,c,padding,dilation", [
    (3, True, "mean", "same", 1),
    (3, False, 0.5, "same", 2),
    ((2, 3), True, 1.0, "valid", 1),
    (3, True, "mean", "valid", 2),
    ((4, 3), False, "mean", "same", 1),
])
def test_matches_loop(kernel, across, c, padding, dilation):
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    window = gaussian_window(kernel, dtype=torch.float64)
    kwargs = dict(across_channels=across, c=c, padding=padding, dilation=dilation)
    y, g = values_and_grads(lambda t: local_contrast_norm(t, window, **kwargs), x)
    y_ref, g_ref = values_and_grads(lambda t: loop_lcn(t, window, across, c, padding, dilation), x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("c", ["mean", 0.3])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_gradcheck(c, padding):
    x = torch.randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LocalContrastNorm2d(3, sigma=1.0, c=c, padding=padding), (x,))
    x1 = torch.randn(1, 2, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LocalContrastNorm1d(3, c=c, padding=padding, dilation=2), (x1,))


def test_1d_is_2d_on_a_single_row():
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    one = LocalContrastNorm1d(5, dilation=2, padding="valid")(x)
    two = local_contrast_norm(x.unsqueeze(2), gaussian_window((1, 5), sigma=1.25, dtype=torch.float64),
                              padding="valid", dilation=(1, 2)).squeeze(2)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-14)
    assert one.shape == (2, 3, 20 - 2 * 8)


def test_contrast_invariance_and_flat_input():
    # With c = mean(sigma), y(a x + b) = y(x) for a > 0: normalised contrast does not depend on
    # brightness or gain (away from the borders' zero padding, so valid mode).
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    m = LocalContrastNorm2d(5, padding="valid")
    torch.testing.assert_close(m(3.0 * x + 7.0), m(x), rtol=0, atol=1e-10)
    flat = torch.full((1, 2, 12, 12), 5.0, dtype=torch.float64, requires_grad=True)
    y = LocalContrastNorm2d(5)(flat)
    y.sum().backward()
    # no contrast: rounding-level residue of the border re-normalisation, divided by eps, and no NaN
    assert y.abs().max() < 1e-6 and torch.isfinite(flat.grad).all()


def test_valid_mode_is_local_and_dilation_is_subsampling():
    """What the dense converter relies on: valid-mode LCN (constant c) on a crop is the crop of
    LCN on the whole image, and the dilated window on an image is the plain window on its sub-grids."""
    x = torch.randn(1, 3, 30, 28, dtype=torch.float64)
    m = LocalContrastNorm2d(5, c=0.7, padding="valid")
    full = m(x)
    crop = m(x[..., 4:21, 6:20])
    torch.testing.assert_close(crop, full[..., 4:4 + crop.shape[2], 6:6 + crop.shape[3]], rtol=0, atol=1e-13)
    assert m.shrink() == (8, 8) and full.shape[2:] == (30 - 8, 28 - 8)
    dilated = LocalContrastNorm2d(5, c=0.7, padding="valid", dilation=2)(x)  # (1, 3, 14, 12)
    assert dilated.shape[2:] == (30 - 16, 28 - 16)
    for r, q in itertools.product(range(2), range(2)):
        torch.testing.assert_close(dilated[..., r::2, q::2], m(x[..., r::2, q::2]), rtol=0, atol=1e-13)


def test_float32_close_to_float64():
    x = torch.randn(2, 4, 24, 24, dtype=torch.float64)
    m = LocalContrastNorm2d(9)
    torch.testing.assert_close(m(x.float()), m(x).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: LocalContrastNorm2d(5, padding="valid")(torch.zeros(1, 1, 8, 8)), "needs an input of at least"),
    (lambda: LocalContrastNorm2d(3)(torch.zeros(1, 8, 8)), "4-d input"),
    (lambda: LocalContrastNorm2d(3)(torch.zeros(1, 1, 8, 8, dtype=torch.long)), "floating-point"),
    (lambda: LocalContrastNorm2d(3, padding="full"), "padding"),
    (lambda: LocalContrastNorm2d(3, c=-1.0), "c must be"),
    (lambda: LocalContrastNorm2d(0), "kernel_size"),
    (lambda: gaussian_window(3, sigma=0.0), "sigma"),
    (lambda: local_contrast_norm(torch.zeros(1, 1, 8, 8), -torch.ones(3, 3)), "non-negative"),
    (lambda: local_contrast_norm(torch.zeros(1, 1, 8, 8), torch.ones(3, 3, 3)), "1-d .* or 2-d"),
])
def test_bad_arguments_are_config_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
