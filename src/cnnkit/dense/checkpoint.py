"""Segmentation checkpoints: weights in safetensors (no pickle, cannot run code), with the patch
net's name, options and preprocessing as JSON in the file's string metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from cnnkit.dense import nets
from cnnkit.errors import CheckpointError, ConfigError
from cnnkit.utils import atomic_path

FORMAT = "cnnkit-segment"
VERSION = 1


def save_segmenter(path: str | Path, model: nn.Module, meta: dict) -> Path:
    """Write ``model``'s weights and ``meta`` (net, net_args, patch, border, mean, std, ...)
    atomically: a crash leaves the previous file or none."""
    for key in ("net", "net_args", "patch"):
        if key not in meta:
            raise ConfigError(f"checkpoint metadata needs {key!r}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "version": VERSION, **meta}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"cnnkit": json.dumps(header, sort_keys=True)})
    return path


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the patch net from the metadata and load its weights; returns (model in eval, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("cnnkit")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file ({exc}); pass a `cnnkit segment train` "
                              "checkpoint") from None
    if raw is None:
        raise CheckpointError(f"{path} has no cnnkit metadata; pass a `cnnkit segment train` checkpoint")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a {meta.get('format')!r} checkpoint, not a segmentation one")
    model, _ = nets.build(meta["net"], **meta["net_args"])
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit net {meta['net']!r} "
                              f"({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), meta
