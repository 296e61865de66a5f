"""Small patch classifiers used by the lecture, the benchmarks and ``cnnkit segment``.

Each builder returns ``(model, patch_size)``; the model maps ``(N, C, P, P)`` to ``(N, K)`` scores.
All are plain ``nn.Sequential`` with no padding, so ``densify`` converts them exactly.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cnnkit.errors import ConfigError


def toy_net(in_channels: int = 1, num_classes: int = 2, width: int = 4) -> tuple[nn.Module, int]:
    """The lecture's toy example: 15 x 15 patch; conv1 2x2/1, pool1 2x2/2, conv2 2x2/1,
    pool2 3x3/3, conv3 2x2/1 (15 -> 14 -> 7 -> 6 -> 2 -> 1). Channel widths are ours (the lecture
    shows single maps)."""
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(in_channels, width, 2))
    model.add_module("pool1", nn.MaxPool2d(2, 2))
    model.add_module("conv2", nn.Conv2d(width, 2 * width, 2))
    model.add_module("pool2", nn.MaxPool2d(3, 3))
    model.add_module("conv3", nn.Conv2d(2 * width, num_classes, 2))
    model.add_module("flatten", nn.Flatten())
    return model, 15


def descriptor_net(in_channels: int = 1, num_classes: int = 128) -> tuple[nn.Module, int]:
    """Simo-Serra et al. (ICCV 2015) descriptor network as used by Bailer et al. (BMVC 2017):
    64 x 64 patches, conv 7x7 32, tanh, max-pool 2/2, conv 6x6 64, tanh, max-pool 3/3, conv 5x5 128,
    tanh, max-pool 4/4 -> a 128-D descriptor per pixel (``num_classes`` is its length)."""
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(in_channels, 32, 7))
    model.add_module("tanh1", nn.Tanh())
    model.add_module("pool1", nn.MaxPool2d(2, 2))
    model.add_module("conv2", nn.Conv2d(32, 64, 6))
    model.add_module("tanh2", nn.Tanh())
    model.add_module("pool2", nn.MaxPool2d(3, 3))
    model.add_module("conv3", nn.Conv2d(64, num_classes, 5))
    model.add_module("tanh3", nn.Tanh())
    model.add_module("pool3", nn.MaxPool2d(4, 4))
    model.add_module("flatten", nn.Flatten())
    return model, 64


def membrane_net(in_channels: int = 1, num_classes: int = 2) -> tuple[nn.Module, int]:
    """Ciresan et al. (NIPS 2012) membrane segmentation net N3-like: 65 x 65 patches, conv 4x4 48,
    pool 2/2, conv 5x5 48, pool 2/2, conv 4x4 48, pool 2/2, FC 200, FC 2. The paper's non-linearity
    is not listed with the layers; we put tanh after each conv and the first FC layer."""
    model = nn.Sequential()
    for i, (cin, k) in enumerate(((in_channels, 4), (48, 5), (48, 4)), start=1):
        model.add_module(f"conv{i}", nn.Conv2d(cin, 48, k))
        model.add_module(f"tanh{i}", nn.Tanh())
        model.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
    model.add_module("flatten", nn.Flatten())  # 48 x 5 x 5
    model.add_module("fc4", nn.Linear(48 * 5 * 5, 200))
    model.add_module("tanh4", nn.Tanh())
    model.add_module("fc5", nn.Linear(200, num_classes))
    return model, 65


def segment_net(in_channels: int = 3, num_classes: int = 2, width: int = 16, patch: int = 28
                ) -> tuple[nn.Module, int]:
    """A small patch classifier for ``cnnkit segment``: two 3x3 conv + ReLU pairs, max-pool 2/2,
    twice, then FC 4w, dropout, FC K. ``patch`` >= 16; the FC layer reads whatever map remains."""
    if patch < 16:
        raise ConfigError(f"segment_net needs a patch of at least 16 pixels, got {patch}")
    model = nn.Sequential()
    c = in_channels
    for stage, w in enumerate((width, 2 * width), start=1):
        model.add_module(f"conv{stage}a", nn.Conv2d(c, w, 3))
        model.add_module(f"relu{stage}a", nn.ReLU())
        model.add_module(f"conv{stage}b", nn.Conv2d(w, w, 3))
        model.add_module(f"relu{stage}b", nn.ReLU())
        model.add_module(f"pool{stage}", nn.MaxPool2d(2, 2))
        c = w
    m = ((patch - 4) // 2 - 4) // 2
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc1", nn.Linear(c * m * m, 4 * width))
    model.add_module("relu_fc", nn.ReLU())
    model.add_module("drop", nn.Dropout(0.25))
    model.add_module("fc2", nn.Linear(4 * width, num_classes))
    return model, patch


NETS: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "toy": toy_net,
    "descriptor": descriptor_net,
    "membrane": membrane_net,
    "segment": segment_net,
}


def build(name: str, **kwargs) -> tuple[nn.Module, int]:
    if name not in NETS:
        raise ConfigError(f"unknown patch net {name!r}; choose one of {', '.join(NETS)}")
    try:
        return NETS[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for patch net {name!r}: {exc}") from None
