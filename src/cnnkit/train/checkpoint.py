"""Self-describing checkpoints that cannot execute code when loaded.

One safetensors file holds every tensor (weights, optimizer buffers, mean image, RNG states) and a
JSON document in its metadata (model name and options, epoch, class names, optimizer hyper-parameters,
scheduler state, the run's configuration). Nothing is unpickled: a crafted pickle given as a
checkpoint is refused before any of its bytes are interpreted as code.

Files are written atomically (temporary file, fsync, rename), so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cnnkit.errors import CheckpointError
from cnnkit.train.checkpoint_schema import DAMAGED, check_consistency, check_document, check_model_plan
from cnnkit.utils import atomic_path

log = logging.getLogger(__name__)

FORMAT = "cnnkit-checkpoint/1"


@dataclass
class Checkpoint:
    """What a checkpoint holds. ``meta`` is the JSON part; the rest are tensors or decoded states."""

    model_name: str
    model_options: dict
    model_state: dict[str, torch.Tensor]
    classes: list[str]
    mean_image: torch.Tensor | None = None
    epoch: int = 0
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    rng_state: dict | None = None
    meta: dict = field(default_factory=dict)  # config, metrics, data description, ...
    live_state: dict[str, torch.Tensor] | None = None  # the optimiser's weights when model_state is an average

    def build_model(self) -> nn.Module:
        """The model with these weights (zoo models by name), with the head options it was trained with.
        Its size and shapes are checked on the meta device first (``check_model_plan``)."""
        from cnnkit.models import create
        from cnnkit.train.losses import l2_normalize_head_input

        source = self.meta.get("path", "checkpoint")
        build = partial(create, self.model_name, **self.model_options)
        check_model_plan(build, {k: v.shape for k, v in self.model_state.items()}, source, self.model_name)
        model = build()
        load_weights(model, self.model_state, source=source)
        if self.meta.get("config", {}).get("l2_features"):
            l2_normalize_head_input(model)
        return model

    def require(self, key: str):
        """``meta[key]``, or a CheckpointError naming the file when it lacks that field (fields that only
        some commands read, such as ``input_size``, are required where they are read)."""
        if key not in self.meta:
            raise CheckpointError(f"{self.meta.get('path', 'checkpoint')}: metadata field 'meta.{key}' is missing; "
                                  f"{DAMAGED}")
        return self.meta[key]


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(
            f"{source} does not fit this model ({detail[:200]}); use the model and options it was trained with"
        ) from None


# --------------------------------------------------------------------------- RNG states


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) for torch CPU/CUDA, NumPy and Python RNGs."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    np_state = np.random.get_state()
    tensors["rng/numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py_version, py_internal, py_gauss = random.getstate()
    doc = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
           "python": [py_version, list(py_internal), py_gauss]}
    return tensors, doc


def restore_rng_state(tensors: dict[str, torch.Tensor], doc: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, cached = doc["numpy"]
    np.random.set_state((name, tensors["rng/numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = doc["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------- optimizer state


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, doc = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, buffers in state["state"].items():
        doc["state"][str(pid)] = {}
        for key, value in buffers.items():
            if torch.is_tensor(value):
                tensors[f"optim/{pid}/{key}"] = value
                doc["state"][str(pid)][key] = {"tensor": f"optim/{pid}/{key}"}
            else:
                doc["state"][str(pid)][key] = {"value": value}
    return tensors, doc


def _join_optimizer_state(tensors: dict[str, torch.Tensor], doc: dict) -> dict:
    state = {}
    for pid, buffers in doc["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in buffers.items()}
    return {"state": state, "param_groups": doc["param_groups"]}


# --------------------------------------------------------------------------- save / load


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically as one safetensors file."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in ckpt.model_state.items()}
    doc: dict = {
        "format": FORMAT,
        "model_name": ckpt.model_name,
        "model_options": ckpt.model_options,
        "classes": list(ckpt.classes),
        "epoch": ckpt.epoch,
        "meta": ckpt.meta,
    }
    if ckpt.mean_image is not None:
        tensors["mean_image"] = ckpt.mean_image
    if ckpt.live_state is not None:
        tensors.update({f"live/{k}": v for k, v in ckpt.live_state.items()})
    if ckpt.optimizer_state is not None:
        t, d = _split_optimizer_state(ckpt.optimizer_state)
        tensors.update(t)
        doc["optimizer"] = d
    if ckpt.scheduler_state is not None:
        doc["scheduler"] = ckpt.scheduler_state
    if ckpt.rng_state is not None:
        tensors.update(ckpt.rng_state["tensors"])
        doc["rng"] = ckpt.rng_state["doc"]
    # safetensors wants contiguous CPU tensors that share no memory
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"cnnkit": json.dumps(doc, default=_json_default)})
    return path


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in checkpoint metadata")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; anything else is refused with a CheckpointError.

    The metadata and the model it describes are checked (``cnnkit.train.checkpoint_schema``) before any
    tensor is read or any model built.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .safetensors file "
                              "from a run folder (e.g. runs/NAME/best.safetensors)")
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception:
        raise CheckpointError(
            f"{path} is not a cnnkit checkpoint (expected a safetensors file; pickled files are refused "
            "because loading them can execute code)"
        ) from None
    with f:
        doc = _document(f.metadata() or {}, path)
        info = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        check_document(doc, info, str(path))
        if ":" not in doc["model_name"]:  # a user's net is checked once its code is allowed (segmentation)
            from cnnkit.models import create

            weights = {k[len("model/"):]: shape for k, (shape, _) in info.items() if k.startswith("model/")}
            check_model_plan(partial(create, doc["model_name"], **doc["model_options"]), weights, str(path),
                             doc["model_name"])
        check_consistency(doc, str(path))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: v.to(map_location) if not k.startswith("rng/") else v for k, v in tensors.items()}
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    live_state = {k[len("live/"):]: v for k, v in tensors.items() if k.startswith("live/")} or None
    meta = dict(doc["meta"])
    meta["path"] = str(path)
    ckpt = Checkpoint(
        model_name=doc["model_name"],
        model_options=doc["model_options"],
        model_state=model_state,
        classes=doc["classes"],
        mean_image=tensors.get("mean_image"),
        epoch=doc["epoch"],
        scheduler_state=doc.get("scheduler"),
        meta=meta,
        live_state=live_state,
    )
    if "optimizer" in doc:
        ckpt.optimizer_state = _join_optimizer_state(tensors, doc["optimizer"])
    if "rng" in doc:
        ckpt.rng_state = {"tensors": {k: v for k, v in tensors.items() if k.startswith("rng/")},
                          "doc": doc["rng"]}
    return ckpt


def _document(header: dict, path: Path):
    """The JSON document of a file's metadata (its schema is checked by ``check_document``)."""
    if "cnnkit" not in header:
        raise CheckpointError(f"{path} is a safetensors file but not a cnnkit checkpoint "
                              f"(no '{FORMAT}' metadata); pass a checkpoint from a cnnkit run folder")
    try:
        doc = json.loads(header["cnnkit"])
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: its 'cnnkit' metadata is not JSON; {DAMAGED}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: its 'cnnkit' metadata must be a JSON object, found "
                              f"{json.dumps(doc)[:40]}; {DAMAGED}")
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a cnnkit checkpoint (metadata field 'format' "
                              f"is {json.dumps(doc.get('format'))[:40]}, expected '{FORMAT}'); {DAMAGED}")
    return doc
