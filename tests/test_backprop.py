"""cnnkit.backprop (the lecture's sensitivity equations in NumPy) against PyTorch autograd.

Random conv/activation/pool stacks, 1D and 2D, with strides, padding and overlapping max and
average pooling; forward values, the input's sensitivity and every dJ/dw, dJ/db agree to 1e-10.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnkit import backprop as bp
from cnnkit.errors import ConfigError

TOL = 1e-10
N_STACKS = 30


def random_stack(rng: np.random.Generator, dims: int) -> tuple[list, tuple[int, ...]]:
    """A random conv -> activation -> (pool) stack that fits its random input; returns layers, input shape."""
    size = [int(rng.integers(9, 15)) for _ in range(dims)]
    channels = int(rng.integers(1, 4))
    in_shape = (2, channels, *size)
    layers = []
    for _ in range(int(rng.integers(1, 4))):
        k = tuple(int(rng.integers(1, 4)) for _ in range(dims))
        s = tuple(int(rng.integers(1, 3)) for _ in range(dims))
        p = tuple(int(rng.integers(0, ki)) for ki in k)  # at most k - 1
        out = [(n + 2 * pi - ki) // si + 1 for n, ki, si, pi in zip(size, k, s, p)]
        if min(out) < 1:
            break
        o = int(rng.integers(1, 4))
        w = rng.normal(size=(o, channels, *k)) / np.sqrt(channels * np.prod(k))
        layers += [bp.Conv(w, rng.normal(size=o) * 0.1, stride=s, padding=p),
                   bp.Tanh() if rng.random() < 0.5 else bp.ReLU()]
        size, channels = out, o
        kp = tuple(int(rng.integers(2, 4)) for _ in range(dims))
        sp = tuple(int(rng.integers(1, ki + 1)) for ki in kp)  # stride < kernel: overlapping windows
        if rng.random() < 0.8 and all(n >= ki for n, ki in zip(size, kp)):
            layers.append((bp.MaxPool if rng.random() < 0.5 else bp.AvgPool)(kp, sp))
            size = [(n - ki) // si + 1 for n, ki, si in zip(size, kp, sp)]
    return layers, in_shape


def torch_forward(layers: list, x: torch.Tensor, params: list[tuple[torch.Tensor, torch.Tensor]]):
    dims = x.dim() - 2
    conv, maxp, avgp = ((F.conv1d, F.max_pool1d, F.avg_pool1d) if dims == 1
                        else (F.conv2d, F.max_pool2d, F.avg_pool2d))
    params = iter(params)
    for layer in layers:
        if isinstance(layer, bp.Conv):
            w, b = next(params)
            x = conv(x, w, b, stride=layer.stride, padding=layer.padding)
        elif isinstance(layer, bp.Tanh):
            x = torch.tanh(x)
        elif isinstance(layer, bp.ReLU):
            x = torch.relu(x)
        elif isinstance(layer, bp.MaxPool):
            x = maxp(x, layer.kernel, layer.stride)
        else:
            x = avgp(x, layer.kernel, layer.stride)
    return x


def check_against_autograd(layers: list, in_shape: tuple[int, ...], rng: np.random.Generator) -> None:
    x = rng.normal(size=in_shape)
    net = bp.Network(layers)
    y = net.forward(x)
    target = rng.normal(size=y.shape)
    loss, delta = bp.squared_error(y, target)
    delta_x = net.backward(delta)

    xt = torch.tensor(x, requires_grad=True)
    params = [(torch.tensor(layer.weight, requires_grad=True), torch.tensor(layer.bias, requires_grad=True))
              for layer in layers if isinstance(layer, bp.Conv)]
    yt = torch_forward(layers, xt, params)
    loss_t = 0.5 * ((torch.tensor(target) - yt) ** 2).sum()
    loss_t.backward()

    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=TOL)
    assert abs(loss - loss_t.item()) < TOL
    np.testing.assert_allclose(delta_x, -xt.grad.numpy(), rtol=0, atol=TOL)  # delta = -dJ/dx
    convs = [layer for layer in layers if isinstance(layer, bp.Conv)]
    for layer, (w, b) in zip(convs, params):
        np.testing.assert_allclose(layer.grad_weight, w.grad.numpy(), rtol=0, atol=TOL)
        np.testing.assert_allclose(layer.grad_bias, b.grad.numpy(), rtol=0, atol=TOL)


@pytest.mark.parametrize("dims", [1, 2])
def test_random_stacks_match_autograd(dims):
    rng = np.random.default_rng(dims)
    seen = {"strided conv": 0, "padded conv": 0, "overlapping max": 0, "overlapping avg": 0}
    for _ in range(N_STACKS):
        layers, in_shape = random_stack(rng, dims)
        check_against_autograd(layers, in_shape, rng)
        for layer in layers:
            if isinstance(layer, bp.Conv):
                seen["strided conv"] += max(np.atleast_1d(layer.stride)) > 1
                seen["padded conv"] += max(np.atleast_1d(layer.padding)) > 0
            elif isinstance(layer, (bp.MaxPool, bp.AvgPool)):
                overlapping = any(s < k for s, k in zip(layer.stride, layer.kernel))
                seen["overlapping max" if isinstance(layer, bp.MaxPool) else "overlapping avg"] += overlapping
    assert all(count >= 3 for count in seen.values()), seen  # the random stacks cover every case


def test_overlapping_max_pool_adds_sensitivities():
    # 1D input [0, 5, 1], windows of 2 with stride 1: position 1 is the max of both windows.
    pool = bp.MaxPool(2, 1)
    assert pool.forward(np.array([[[0.0, 5.0, 1.0]]])).tolist() == [[[5.0, 5.0]]]
    assert pool.backward(np.array([[[1.0, 2.0]]])).tolist() == [[[0.0, 3.0, 0.0]]]


def test_overlapping_avg_pool_spreads_evenly():
    pool = bp.AvgPool(2, 1)
    pool.forward(np.zeros((1, 1, 3)))
    assert pool.backward(np.array([[[2.0, 4.0]]])).tolist() == [[[1.0, 3.0, 2.0]]]


def test_conv_weight_gradient_is_correlation_of_sensitivity_with_input():
    # The lecture: dJ/dw_m = -sum_j delta_j x_{j+m} (correlation form), 1D, stride 1.
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(1, 1, 7)), rng.normal(size=(1, 1, 3))
    conv = bp.Conv(w, np.zeros(1))
    conv.forward(x)
    delta = rng.normal(size=(1, 1, 5))
    conv.backward(delta)
    expected = [-sum(delta[0, 0, j] * x[0, 0, j + m] for j in range(5)) for m in range(3)]
    np.testing.assert_allclose(conv.grad_weight[0, 0], expected, rtol=0, atol=1e-14)


def test_kernel_larger_than_input_is_a_config_error():
    with pytest.raises(ConfigError, match="larger than its input"):
        bp.Conv(np.zeros((1, 1, 5)), np.zeros(1)).forward(np.zeros((1, 1, 3)))
    with pytest.raises(ConfigError, match="larger than its input"):
        bp.MaxPool(4).forward(np.zeros((1, 1, 3, 3)))
