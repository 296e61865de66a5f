"""Patch classifiers of the pixelwise papers: each maps a P x P patch to K scores for its centre pixel.

Every net here is an ``nn.Sequential`` with no zero padding inside, so ``cnnkit.dense.densify``
converts it exactly; each sets ``model.patch_size = (P, P)`` and ``model.input_size = (C, P, P)``.
Floor-mode pooling that drops the last row of a map (Ciresan's 65 x 65 nets) is exact too: the
dense net drops the same relative positions. ``create_patch_net`` builds a registered one by name,
or a user's own net from ``package.module:function``.

- ``toy``: the lecture's toy example (Li, Zhao, Wang, arXiv:1412.4526): 15 x 15 patch; conv1 2x2/1,
  pool1 2x2/2, conv2 2x2/1, pool2 3x3/3, conv3 2x2/1 (15 -> 14 -> 7 -> 6 -> 2 -> 1). The channel
  widths are ours (the lecture draws single maps). 222 parameters with the defaults.
- ``descriptor``: Simo-Serra et al.'s descriptor net (ICCV 2015) as benchmarked by Bailer et al.
  (BMVC 2017): 64 x 64 patch, conv 7x7 32, tanh, max-pool 2/2, conv 6x6 64, tanh, max-pool 3/3,
  conv 5x5 128, tanh, max-pool 4/4: a 128-D descriptor per pixel, so ``num_classes`` (the
  descriptor length) defaults to 128. 280,320 parameters.
- ``segment``: our own small net for ``cnnkit segment`` (no paper): two 3x3 conv + ReLU pairs and a
  2x2 max-pool, twice, then FC 4w, ReLU, dropout 0.25, FC K; ``width`` w and ``patch`` (>= 16)
  are options. 49,618 parameters with the defaults (w = 16, 28 x 28, RGB, K = 2).
- ``segment3d``: ``segment`` for volumes (no paper): Conv3d 3x3x3 and MaxPool3d 2 in place of the 2D
  layers, on a P x P x P block; ``width`` (default 8) and ``patch`` (default 16, >= 16) are options.
  12,970 parameters with the defaults (one channel, K = 2). Listed in ``PATCH_NETS_3D``.
- ``ciresan_n1`` .. ``ciresan_n4``: D. Ciresan, A. Giusti, L. Gambardella, J. Schmidhuber, "Deep
  neural networks segment neuronal membranes in electron microscopy images", NIPS 2012, Table 1:
  48 maps in every convolutional layer, each followed by 2x2 max-pooling, then FC 200 and FC 2.
  ``CIRESAN`` holds the window and the conv kernel sizes of each net. N4 (95 x 95): conv 4x4, 5x5,
  4x4, 4x4 (95 -> 92 -> 46 -> 42 -> 21 -> 18 -> 9 -> 6 -> 3), 219,290 parameters. N1-N3 (65 x 65):
  conv 4x4, 5x5, 4x4 (65 -> 62 -> 31 -> 27 -> 13 -> 10 -> 5), 335,978 parameters each.
  What we could confirm and what we could not (we could not read the paper's table itself):
  * N4's layer list (window 95, kernels 4-5-4-4, 48 maps, 2x2 pooling, FC 200, 2 outputs) agrees
    with the ZNN reproduction of N4 (seung-lab/znn-release, ``networks/N4.spec``).
  * N1-N3's layer lists are NOT confirmed. We give each of them N4 without its last conv + pool
    pair, which fits a 65 x 65 window (so does, e.g., 4-4-4; we chose the N4 prefix), the same
    layers as this package's earlier "N3-like" ``membrane`` net. We believe the paper's N1-N3
    differ in training and input preprocessing (foveation, nonuniform sampling) rather than in
    layers, but have not confirmed it: if their layer lists differ, these entries are wrong.
  * Non-linearity (deviation): ``tanh`` after every convolution and after FC 200; the ZNN
    reproduction uses the scaled tanh 1.7159 tanh(2x/3). The paper's output layer gives "a
    calibrated probability for each class" (its abstract); ours gives the scores and the loss
    applies the softmax.
- ``liskowski``: P. Liskowski, K. Krawiec, "Segmenting retinal blood vessels with deep neural
  networks", IEEE TMI 2016, their "plain" network on 27 x 27 RGB patches: conv 3x3 64, conv 3x3 64,
  max-pool 2x2, conv 3x3 128, conv 3x3 128, max-pool 2x2, FC 512, FC 512, FC 2, ReLU, dropout 0.5
  on the hidden FC layers (27 -> 25 -> 23 -> 11 -> 9 -> 7 -> 3). 1,114,178 parameters.
  NOT confirmed against the paper (we could not read it). Padding (unknown whether a
  deviation): our convolutions are unpadded, as the exact dense conversion needs; with "same"
  padding (one third-party reimplementation pads) the map before FC 512 would be 6 x 6 and the
  net 2,883,650 parameters. Options: ``width`` multiplies every layer width (1.0 = the paper),
  ``dropout`` sets the FC dropout. Initialisation (ours, not stated as the paper's): He et al.'s
  (``he_init``), as for ``segment``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.models.registry import create, list_models, register_model

PATCH_NETS: list[str] = []  # the registered patch nets (2D), in registration order
PATCH_NETS_3D: list[str] = []  # the registered 3D patch nets (volumes: ``cnnkit segment train --volume 3d``)

LI = ("Li, Zhao, Wang. Highly efficient forward and backward propagation of convolutional neural networks "
      "for pixelwise classification. arXiv:1412.4526, 2014")
CIRESAN_PAPER = ("Ciresan, Giusti, Gambardella, Schmidhuber. Deep neural networks segment neuronal membranes "
                 "in electron microscopy images. NIPS 2012")
LISKOWSKI_PAPER = "Liskowski, Krawiec. Segmenting retinal blood vessels with deep neural networks. IEEE TMI 2016"

# Ciresan et al., Table 1: window and conv kernel sizes; 48 maps, 2x2 max-pooling after each conv
CIRESAN: dict[str, tuple[int, tuple[int, ...]]] = {
    "n1": (65, (4, 5, 4)),
    "n2": (65, (4, 5, 4)),
    "n3": (65, (4, 5, 4)),
    "n4": (95, (4, 5, 4, 4)),
}
CIRESAN_MAPS, CIRESAN_HIDDEN = 48, 200
CIRESAN_PARAMS = {"n1": 335_978, "n2": 335_978, "n3": 335_978, "n4": 219_290}


def register_patch_net(name: str, **info) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """``register_model`` for a patch net: also lists it in ``PATCH_NETS`` (``PATCH_NETS_3D`` when its
    ``input_size`` is (C, P, P, P))."""
    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        register_model(name, pooling="floor", **info)(builder)
        (PATCH_NETS_3D if len(info["input_size"]) == 4 else PATCH_NETS).append(name)
        return builder
    return decorate


def he_init(model: nn.Sequential) -> nn.Sequential:
    """He et al. 2015 initialisation for ReLU nets: weights N(0, 2 / fan_in), biases 0; the last layer
    N(0, 0.01^2), so that training starts from near-uniform class scores. PyTorch's default (uniform,
    variance 1 / (3 fan_in)) shrinks the signal by about sqrt(6) per ReLU layer."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear))]
    for m in layers[:-1]:
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.zeros_(m.bias)
    nn.init.normal_(layers[-1].weight, std=0.01)
    nn.init.zeros_(layers[-1].bias)
    return model


def _patch_net(model: nn.Sequential, in_chans: int, patch: int, dims: int = 2) -> nn.Sequential:
    model.patch_size = (patch,) * dims
    model.input_size = (in_chans, *model.patch_size)
    return model


@register_patch_net("toy", paper=LI, input_size=(1, 15, 15), num_classes=2, normalisation="none",
                    reference_params=222, notes="the lecture's toy example; channel widths are ours (width=4)")
def toy(num_classes: int = 2, in_chans: int = 1, width: int = 4) -> nn.Sequential:
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(in_chans, width, 2))  # (B, w, 14, 14)
    model.add_module("pool1", nn.MaxPool2d(2, 2))  # (B, w, 7, 7)
    model.add_module("conv2", nn.Conv2d(width, 2 * width, 2))  # (B, 2w, 6, 6)
    model.add_module("pool2", nn.MaxPool2d(3, 3))  # (B, 2w, 2, 2)
    model.add_module("conv3", nn.Conv2d(2 * width, num_classes, 2))  # (B, K, 1, 1)
    model.add_module("flatten", nn.Flatten())
    return _patch_net(model, in_chans, 15)


@register_patch_net(
    "descriptor",
    paper="Simo-Serra, Trulls, Ferraz, Kokkinos, Fua, Moreno-Noguer. Discriminative learning of deep "
    "convolutional feature point descriptors. ICCV 2015",
    input_size=(1, 64, 64), num_classes=128, normalisation="none", reference_params=280_320,
    notes="as benchmarked by Bailer et al. BMVC 2017; num_classes is the descriptor length (128)")
def descriptor(num_classes: int = 128, in_chans: int = 1) -> nn.Sequential:
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(in_chans, 32, 7))  # (B, 32, 58, 58)
    model.add_module("tanh1", nn.Tanh())
    model.add_module("pool1", nn.MaxPool2d(2, 2))  # (B, 32, 29, 29)
    model.add_module("conv2", nn.Conv2d(32, 64, 6))  # (B, 64, 24, 24)
    model.add_module("tanh2", nn.Tanh())
    model.add_module("pool2", nn.MaxPool2d(3, 3))  # (B, 64, 8, 8)
    model.add_module("conv3", nn.Conv2d(64, num_classes, 5))  # (B, K, 4, 4)
    model.add_module("tanh3", nn.Tanh())
    model.add_module("pool3", nn.MaxPool2d(4, 4))  # (B, K, 1, 1)
    model.add_module("flatten", nn.Flatten())
    return _patch_net(model, in_chans, 64)


def _segment_net(name: str, dims: int, num_classes: int, in_chans: int, width: int, patch: int) -> nn.Sequential:
    """Two k^dims conv (k = 3) + ReLU pairs, max-pool 2/2, twice, then FC 4w, dropout, FC K; the FC
    layer reads whatever map remains of the patch. He initialisation (``he_init``)."""
    if not isinstance(patch, int) or patch < 16:
        unit = "pixels" if dims == 2 else "voxels"
        raise ConfigError(f"patch net '{name}' needs patch >= 16 {unit}, got {patch!r}; pass a larger patch")
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if dims == 2 else (nn.Conv3d, nn.MaxPool3d)
    model = nn.Sequential()
    c = in_chans
    for stage, w in enumerate((width, 2 * width), start=1):
        model.add_module(f"conv{stage}a", conv(c, w, 3))
        model.add_module(f"relu{stage}a", nn.ReLU())
        model.add_module(f"conv{stage}b", conv(w, w, 3))
        model.add_module(f"relu{stage}b", nn.ReLU())
        model.add_module(f"pool{stage}", pool(2, 2))
        c = w
    m = ((patch - 4) // 2 - 4) // 2
    model.add_module("flatten", nn.Flatten())  # (B, 2w * m^dims)
    model.add_module("fc1", nn.Linear(c * m**dims, 4 * width))
    model.add_module("relu_fc", nn.ReLU())
    model.add_module("drop", nn.Dropout(0.25))
    model.add_module("fc2", nn.Linear(4 * width, num_classes))
    return _patch_net(he_init(model), in_chans, patch, dims=dims)


@register_patch_net("segment", paper="Ours (cnnkit segment; no paper)",
                    input_size=(3, 28, 28), num_classes=2, normalisation="none", reference_params=49_618,
                    notes="options width (16) and patch (28, at least 16)")
def segment(num_classes: int = 2, in_chans: int = 3, width: int = 16, patch: int = 28) -> nn.Sequential:
    """Two 3x3 conv + ReLU pairs, max-pool 2/2, twice, then FC 4w, dropout, FC K. The FC layer
    reads whatever map remains of the patch. He initialisation (``he_init``)."""
    return _segment_net("segment", 2, num_classes, in_chans, width, patch)


@register_patch_net("segment3d", paper="Ours (cnnkit segment --volume 3d; no paper)",
                    input_size=(1, 16, 16, 16), num_classes=2, normalisation="none", reference_params=12_970,
                    notes="segment in 3D: Conv3d/MaxPool3d; options width (8) and patch (16, at least 16)")
def segment3d(num_classes: int = 2, in_chans: int = 1, width: int = 8, patch: int = 16) -> nn.Sequential:
    """``segment`` for volumes: two 3x3x3 conv + ReLU pairs, max-pool 2/2, twice, then FC 4w, dropout,
    FC K, on a P x P x P block (16 -> 12 -> 6 -> 2 -> 1 with the defaults). He initialisation. Narrower
    than ``segment`` by default (w = 8): a 3D layer costs P times a 2D one."""
    return _segment_net("segment3d", 3, num_classes, in_chans, width, patch)


def ciresan(net: str, num_classes: int = 2, in_chans: int = 1) -> nn.Sequential:
    """Net ``net`` (``"n1"`` .. ``"n4"``) of Ciresan et al.'s Table 1 (see ``CIRESAN``): conv{i},
    tanh{i}, pool{i} per row, then flatten, fc{L}, tanh{L}, fc{L+1}."""
    window, kernels = CIRESAN[net]
    model = nn.Sequential()
    size, c = window, in_chans
    for i, k in enumerate(kernels, start=1):
        model.add_module(f"conv{i}", nn.Conv2d(c, CIRESAN_MAPS, k))
        model.add_module(f"tanh{i}", nn.Tanh())
        model.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
        size, c = (size - k + 1) // 2, CIRESAN_MAPS
    fc = len(kernels) + 1
    model.add_module("flatten", nn.Flatten())  # (B, 48 * M * M): M = 5 for N1-N3, 3 for N4
    model.add_module(f"fc{fc}", nn.Linear(c * size * size, CIRESAN_HIDDEN))
    model.add_module(f"tanh{fc}", nn.Tanh())
    model.add_module(f"fc{fc + 1}", nn.Linear(CIRESAN_HIDDEN, num_classes))
    return _patch_net(model, in_chans, window)


for _net, (_window, _kernels) in CIRESAN.items():
    register_patch_net(
        f"ciresan_{_net}", paper=CIRESAN_PAPER, input_size=(1, _window, _window), num_classes=2,
        normalisation="none", reference_params=CIRESAN_PARAMS[_net],
        notes=f"{_net.upper()}: {_window}x{_window} window, conv {', '.join(f'{k}x{k}' for k in _kernels)} "
        "x 48 maps, each with 2x2 max-pool, FC 200, FC 2; tanh"
        + ("" if _net == "n4" else "; layer list not confirmed from the paper"),
    )(partial(ciresan, _net))


@register_patch_net("liskowski", paper=LISKOWSKI_PAPER, input_size=(3, 27, 27), num_classes=2,
                    normalisation="none", reference_params=1_114_178,
                    notes="the 'plain' net: unpadded convs (padding not confirmed); width multiplies every layer")
def liskowski(num_classes: int = 2, in_chans: int = 3, width: float = 1.0, dropout: float = 0.5) -> nn.Sequential:
    if not isinstance(width, (int, float)) or width <= 0:
        raise ConfigError(f"liskowski option width={width!r} must be a positive number (1.0 = the paper)")
    if not 0 <= dropout < 1:
        raise ConfigError(f"liskowski option dropout={dropout!r} must be in [0, 1)")
    w = {c: max(1, round(width * c)) for c in (64, 128, 512)}
    model = nn.Sequential()
    c, i = in_chans, 0
    for out in (64, 64, "M", 128, 128, "M"):  # 27 -> 25 -> 23 -> 11 -> 9 -> 7 -> 3
        if out == "M":
            model.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
            continue
        i += 1
        model.add_module(f"conv{i}", nn.Conv2d(c, w[out], 3))
        model.add_module(f"relu{i}", nn.ReLU())
        c = w[out]
    model.add_module("flatten", nn.Flatten())  # (B, 128 * 3 * 3) at width 1
    flat = c * 3 * 3
    for i in (5, 6):
        model.add_module(f"fc{i}", nn.Linear(flat, w[512]))
        model.add_module(f"relu{i}", nn.ReLU())
        model.add_module(f"drop{i}", nn.Dropout(dropout))
        flat = w[512]
    model.add_module("fc7", nn.Linear(flat, num_classes))
    return _patch_net(he_init(model), in_chans, 27)


# --------------------------------------------------------------------------- any patch net by name


def create_patch_net(name: str, **options) -> tuple[nn.Module, tuple[int, ...]]:
    """``(model, (P, P))`` (``(P, P, P)`` for a 3D net) for a registered patch net (``"ciresan_n4"``) or
    a user's own net (``"package.module:function"``; see ``user_patch_net``). ``options`` go to the builder."""
    if ":" in name:
        return user_patch_net(name, **options)
    if name not in list_models():
        raise ConfigError(f"unknown patch net {name!r}; choose one of {', '.join(PATCH_NETS + PATCH_NETS_3D)} "
                          "(or your own as package.module:function)")
    if name not in PATCH_NETS + PATCH_NETS_3D:  # a model registered elsewhere: look before building it for real
        with torch.device("meta"):
            probe = create(name, **options)
        if getattr(probe, "patch_size", None) is None:
            raise ConfigError(f"model {name!r} is not a patch net (it has no patch_size); choose one of "
                              f"{', '.join(PATCH_NETS + PATCH_NETS_3D)} (or your own as package.module:function)")
    model = create(name, **options)
    return model, _patch_size(model.patch_size, name)


def user_patch_net(spec: str, **options) -> tuple[nn.Module, tuple[int, int]]:
    """Import ``package.module`` and call ``function`` with the options its signature accepts
    (``num_classes`` and ``in_chans`` are dropped when it does not take them; any other option it
    does not take is an error). The function returns ``(module, patch)``, patch an int, (P, P) or, for
    a 3D net, (P, P, P)."""
    fn = user_patch_builder(spec)
    kwargs = _accepted(fn, options, spec)
    result = fn(**kwargs)
    if not (isinstance(result, Sequence) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ConfigError(f"patch net {spec!r} returned {type(result).__name__}; make it return "
                          "(module, patch_size) with patch_size an int, (P, P) or (P, P, P)")
    model, patch = result
    patch = _patch_size(patch, spec)
    model.patch_size = patch
    model.model_name, model.model_options = spec, dict(kwargs)
    return model, patch


def user_patch_builder(spec: str) -> Callable:
    """The function ``package.module:function`` names, its module imported."""
    module_name, _, func_name = spec.partition(":")
    if not (all(p.isidentifier() for p in module_name.split(".")) and func_name.isidentifier()):
        raise ConfigError(f"patch net {spec!r} is not package.module:function; write it like mynets.retina:build")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as exc:
        raise ConfigError(f"patch net {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); put its folder on PYTHONPATH") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f"patch net {spec!r}: module {module_name!r} has no function {func_name!r}; "
                          "check the name after the colon")
    return fn


def _accepted(fn: Callable, options: dict, spec: str) -> dict:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): pass everything
        return dict(options)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(options)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = [k for k in options if k not in names and k not in ("num_classes", "in_chans")]
    if unknown:
        raise ConfigError(f"patch net {spec!r} takes no option {unknown[0]!r}; "
                          f"it takes: {', '.join(sorted(names)) or 'none'}")
    return {k: v for k, v in options.items() if k in names}


def _patch_size(patch, name: str) -> tuple[int, ...]:
    sides = (patch, patch) if isinstance(patch, int) else tuple(patch) if isinstance(patch, Sequence) else ()
    if len(sides) not in (2, 3) or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in sides):
        raise ConfigError(f"patch net {name!r} has patch size {patch!r}; it must be a positive int, (P, P) "
                          "or (P, P, P)")
    return sides
