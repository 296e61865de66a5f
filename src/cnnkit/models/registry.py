"""The model registry: a dict and a decorator. ``create("alexnet")``, ``list_models("vgg_*")``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from cnnkit.errors import ConfigError


@dataclass(frozen=True)
class ModelInfo:
    """What a registered model is: its paper and the facts needed to use and check it."""

    name: str
    builder: Callable[..., nn.Module]
    paper: str
    input_size: tuple[int, int, int]  # (C, H, W) the paper feeds
    num_classes: int = 1000
    pooling: str = "floor"  # "floor" or "ceil" (Caffe-era nets)
    normalisation: str = ""  # e.g. "LRN paper n=5 alpha=1e-4 beta=0.75 k=2"
    reference_params: int | None = None  # weights + biases with the default head
    notes: str = ""
    defaults: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, **info) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``@register_model("lenet5", paper=..., input_size=(1, 32, 32), num_classes=10)``."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelInfo(name=name, builder=builder, **info)
        return builder

    return decorate


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = fnmatch.filter(_REGISTRY, f"*{name[:3]}*") if name else []
        hint = f" (did you mean {', '.join(sorted(close)[:5])}?)" if close else ""
        raise ConfigError(
            f"unknown model {name!r}{hint}; run `cnnkit models` to list the available ones"
        ) from None


def create(name: str, **options) -> nn.Module:
    """Build a registered model; ``options`` (num_classes, in_chans, dropout, ...) go to its builder."""
    info = model_info(name)
    kwargs = {**info.defaults, **options}
    try:
        model = info.builder(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad option for model {name!r}: {exc}") from None
    model.model_name = name
    model.model_options = dict(options)
    return model
