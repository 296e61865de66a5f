"""LocalResponseNorm in both conventions against the direct formula, channel by channel."""

import pytest
import torch
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.layers import LocalResponseNorm


def direct_lrn(a, n, alpha, beta, k, convention):
    """b_c = a_c / (k + alpha' sum_{c'=max(0, c - n//2)}^{min(C-1, c + (n-1)//2)} a_c'^2)^beta."""
    scale = alpha if convention == "paper" else alpha / n
    C = a.shape[1]
    out = []
    for c in range(C):
        lo, hi = max(0, c - n // 2), min(C - 1, c + (n - 1) // 2)
        energy = sum(a[:, j] ** 2 for j in range(lo, hi + 1))
        out.append(a[:, c] / (k + scale * energy) ** beta)
    return torch.stack(out, dim=1)


def values_and_grads(fn, x):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y) + torch.linspace(0, 1, y.numel()).view_as(y))
    return y.detach(), g


@pytest.mark.parametrize("convention", ["paper", "caffe"])
@pytest.mark.parametrize("n,alpha,beta,k", [(5, 1e-4, 0.75, 2.0), (3, 0.5, 0.75, 1.0), (4, 0.2, 0.5, 1.5),
                                           (1, 1.0, 1.0, 1.0)])
def test_matches_direct_formula(convention, n, alpha, beta, k):
    # large activations so that the normalisation matters (AlexNet's ReLU outputs reach tens)
    x = 10 * torch.randn(2, 7, 4, 5, dtype=torch.float64)
    y, g = values_and_grads(LocalResponseNorm(n, alpha, beta, k, convention), x)
    y_ref, g_ref = values_and_grads(lambda t: direct_lrn(t, n, alpha, beta, k, convention), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-15)


def test_conventions_differ_by_a_factor_n_in_alpha():
    x = 10 * torch.randn(2, 8, 3, 3, dtype=torch.float64)
    paper = LocalResponseNorm(5, 1e-3, 0.75, 2.0, convention="paper")(x)
    torch.testing.assert_close(paper, LocalResponseNorm(5, 5e-3, 0.75, 2.0, convention="caffe")(x),
                               rtol=1e-14, atol=0)
    caffe = LocalResponseNorm(5, 1e-3, 0.75, 2.0, convention="caffe")(x)
    assert torch.equal(caffe, nn.LocalResponseNorm(5, 1e-3, 0.75, 2.0)(x))  # PyTorch is Caffe's
    assert not torch.allclose(paper, caffe, rtol=1e-3)
    assert LocalResponseNorm().convention == "paper" and LocalResponseNorm().k == 2.0  # AlexNet's numbers


def test_any_number_of_spatial_axes_and_gradcheck():
    m = LocalResponseNorm(3, 0.3, 0.75, 1.0)
    for shape in [(2, 6), (2, 6, 5), (1, 6, 3, 4, 2)]:
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(m(x), direct_lrn(x, 3, 0.3, 0.75, 1.0, "paper"), rtol=1e-13, atol=0)
    x = torch.randn(1, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    assert torch.autograd.gradcheck(LocalResponseNorm(4, 0.2, 0.6, 1.5, convention="caffe"), (x,))


@pytest.mark.parametrize("make,match", [
    (lambda: LocalResponseNorm(convention="alexnet"), "convention"),
    (lambda: LocalResponseNorm(0), "size"),
    (lambda: LocalResponseNorm(2.5), "size"),
    (lambda: LocalResponseNorm(k=0.0), "k must be"),
    (lambda: LocalResponseNorm(alpha=-1.0), "alpha and beta"),
    (lambda: LocalResponseNorm()(torch.zeros(5)), r"\(B, C, ...\)"),
])
def test_bad_arguments_are_config_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
