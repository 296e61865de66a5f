"""FFTConv1d/2d: the same results and gradients as nn.Conv1d/2d and as a loop; gradcheck in float64."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.layers import FFTConv1d, FFTConv2d, fft_conv
from cnnkit.layers.fft_conv import next_fast_len

# (in, out, kernel, stride, padding, dilation, groups)
CONFIGS_2D = [
    (3, 4, 3, 1, 1, 1, 1),
    (4, 6, (3, 5), 2, (1, 2), 1, 2),
    (4, 4, 3, 3, 0, 2, 4),
    (3, 6, 5, 1, "same", 2, 3),
    (2, 2, 4, 1, "same", 1, 1),  # even kernel: PyTorch pads one more on the right
    (2, 3, (2, 3), (2, 1), "valid", (1, 3), 1),
    (2, 2, 11, 1, 5, 1, 1),  # a kernel nearly as large as the input
]


def loop_conv2d(x, w, b, stride, padding, dilation, groups):
    """y[n, o, i, j] = b[o] + sum_{c in group(o), a, e} w[o, c, a, e] x_pad[n, c, i*s + a*d, j*s + e*d]."""
    (sh, sw), (dh, dw) = stride, dilation
    xp = F.pad(x, (padding[1][0], padding[1][1], padding[0][0], padding[0][1]))
    O, Cg, kh, kw = w.shape
    oh = (xp.shape[2] - (kh - 1) * dh - 1) // sh + 1
    ow = (xp.shape[3] - (kw - 1) * dw - 1) // sw + 1
    out = torch.zeros(x.shape[0], O, oh, ow, dtype=x.dtype)
    for o in range(O):
        g = o // (O // groups)
        for i, j in itertools.product(range(oh), range(ow)):
            patch = xp[:, g * Cg:(g + 1) * Cg, i * sh: i * sh + (kh - 1) * dh + 1: dh,
                       j * sw: j * sw + (kw - 1) * dw + 1: dw]  # (B, C/g, kh, kw)
            out[:, o, i, j] = (patch * w[o]).sum(dim=(1, 2, 3)) + b[o]
    return out


def pairs(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the reference's own warning
@pytest.mark.parametrize("cin,cout,k,s,p,d,g", CONFIGS_2D)
def test_fft_conv2d_matches_nn_conv2d(cin, cout, k, s, p, d, g):
    torch.manual_seed(0)
    ref = nn.Conv2d(cin, cout, k, s, p, d, g).double()
    fft = FFTConv2d(cin, cout, k, s, p, d, g).double()
    fft.load_state_dict(ref.state_dict())  # same parameters, same names
    x = torch.randn(2, cin, 13, 12, dtype=torch.float64, requires_grad=True)
    y_ref, y = ref(x), fft(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    gy = torch.randn_like(y)
    grads_ref = torch.autograd.grad(y_ref, [x, ref.weight, ref.bias], gy)
    grads = torch.autograd.grad(y, [x, fft.weight, fft.bias], gy)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("cin,cout,k,s,p,d,g", [CONFIGS_2D[1], CONFIGS_2D[3], CONFIGS_2D[4]])
def test_fft_conv2d_matches_loop(cin, cout, k, s, p, d, g):
    torch.manual_seed(1)
    fft = FFTConv2d(cin, cout, k, s, p, d, g).double()
    x = torch.randn(1, cin, 9, 8, dtype=torch.float64)
    kh, kw = fft.kernel_size
    if p == "same":
        totals = [dd * (kk - 1) for kk, dd in zip((kh, kw), pairs(d))]
        pad = [(t // 2, t - t // 2) for t in totals]
    else:
        pad = [(pp, pp) for pp in pairs(0 if p == "valid" else p)]
    x.requires_grad_(True)
    y, ref = fft(x), loop_conv2d(x, fft.weight, fft.bias, pairs(s), pad, pairs(d), g)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    gy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, fft.weight, fft.bias], gy),
                    torch.autograd.grad(ref, [x, fft.weight, fft.bias], gy)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_fft_conv1d_matches_nn_conv1d():
    torch.manual_seed(2)
    configs = [(3, 4, 5, 2, 2, 1, 1), (4, 4, 3, 1, "same", 3, 2), (2, 6, 7, 3, 0, 1, 2)]
    for cin, cout, k, s, p, d, g in configs:
        ref = nn.Conv1d(cin, cout, k, s, p, d, g).double()
        fft = FFTConv1d(cin, cout, k, s, p, d, g).double()
        fft.load_state_dict(ref.state_dict())
        x = torch.randn(3, cin, 29, dtype=torch.float64)
        torch.testing.assert_close(fft(x), ref(x), rtol=0, atol=1e-12)


def test_padding_modes_bias_free_and_float32():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 16, 15)
    for mode in ("zeros", "reflect", "replicate", "circular"):
        ref = nn.Conv2d(3, 5, 5, padding=2, padding_mode=mode, bias=False)
        fft = FFTConv2d(3, 5, 5, padding=2, padding_mode=mode, bias=False)
        fft.load_state_dict(ref.state_dict())
        y = fft(x)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)


def test_gradcheck_float64():
    torch.manual_seed(4)
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: fft_conv(x, w, b, (2, 1), (1, 0), (1, 2), 2), (x, w, b))
    x1 = torch.randn(1, 2, 9, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: fft_conv(x, w, None, 2, "valid", 2), (x1, w1))


def test_next_fast_len():
    assert [next_fast_len(n) for n in (1, 7, 11, 128, 129, 158, 1025)] == [1, 8, 12, 128, 135, 160, 1080]


@pytest.mark.parametrize("call,match", [
    (lambda: FFTConv2d(3, 4, 7)(torch.zeros(1, 3, 5, 9)), "larger than the padded input"),
    (lambda: FFTConv2d(3, 4, 3)(torch.zeros(1, 2, 8, 8)), "expects 3 input channels"),
    (lambda: FFTConv2d(3, 4, 3)(torch.zeros(3, 8, 8)), "4-d input"),
    (lambda: FFTConv2d(3, 4, 3, groups=2), "divisible by groups"),
    (lambda: FFTConv2d(3, 4, 3, stride=2, padding="same"), "needs stride 1"),
    (lambda: FFTConv2d(3, 4, 3, padding="full"), "padding must be"),
    (lambda: FFTConv1d(3, 4, (3, 3)), "kernel_size"),
    (lambda: fft_conv(torch.zeros(1, 2, 5), torch.zeros(2, 2, 1, 1, 1)), "fft_conv weight"),
])
def test_bad_arguments_are_config_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
