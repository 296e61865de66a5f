"""What a checkpoint's metadata may hold, and the model it may build: both checked before anything is built.

A checkpoint is a file from outside the program. A damaged or hand-edited one must give one line that
names the file and the field (a ``CheckpointError``), never a traceback from the code that reads the
field later, nor an attempt to allocate terabytes because its options ask for 10^9 classes. So
``load_checkpoint`` runs, before it reads any tensor:

1. ``check_document``: the JSON document against the tables below: every field cnnkit reads has its
   type and range, the required ones are present, and the optimiser and RNG states name tensors that
   the file holds, with the shapes they need.
2. ``check_model_plan``: the model the file names is built on the ``meta`` device (shapes, no memory);
   more than ``max_params()`` parameters is refused, and the stored weights must have exactly its
   parameter names and shapes.
3. ``check_consistency``: the fields that must agree with each other (class count, positive class, the
   run's own settings).

A field that only some commands need (``input_size``, ``channels``) is required where it is read
(``Checkpoint.require``): fine for ``cnnkit transfer`` is not the same as fine for ``cnnkit predict``.
"""

from __future__ import annotations

import json
import math
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from cnnkit.errors import CheckpointError, CnnkitError, ConfigError

DAMAGED = "the file is damaged or was not written by cnnkit"
MAX_PARAMS_ENV = "CNNKIT_MAX_PARAMS"
DEFAULT_MAX_PARAMS = 2_000_000_000  # 14x VGG-E (144M): a bigger model from a checkpoint is refused unless raised
MAX_SIDE = 16384  # image and patch sides: one 16384 x 16384 RGB float image is already 3 GiB
MAX_CHANNELS = 4096
MAX_OPTION_LIST = 4096  # entries of a list-valued model option (a width per layer, ...)
NUMPY_KEYS = 624  # MT19937's state words (NumPy and Python)


class Rule(NamedTuple):
    want: str  # what a value must be, in words: "a non-negative integer"
    ok: Callable[[Any], bool]


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return (_int(v) and abs(v) < 2**1023) or (isinstance(v, float) and math.isfinite(v))


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, str)) or _number(v)


def _int_in(lo: int, hi: int) -> Rule:
    return Rule(f"an integer in {lo}..{hi}", lambda v: _int(v) and lo <= v <= hi)


def _pair(lo: int, hi: int) -> Rule:
    return Rule(f"a [height, width] list of two integers in {lo}..{hi}",
                lambda v: isinstance(v, list) and len(v) == 2 and all(_int(x) and lo <= x <= hi for x in v))


def optional(rule: Rule) -> Rule:
    return Rule(f"{rule.want} or null", lambda v: v is None or rule.ok(v))


def one_of(choices: Sequence[str]) -> Rule:
    return Rule("one of " + ", ".join(json.dumps(c) for c in choices), lambda v: isinstance(v, str) and v in choices)


STRING = Rule("a string", lambda v: isinstance(v, str))
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
INT = Rule("an integer (64 bits)", lambda v: _int(v) and -(2**63) <= v < 2**64)  # a seed may use all 64
NON_NEGATIVE = Rule("a non-negative integer", lambda v: _int(v) and 0 <= v < 2**63)
NUMBER = Rule("a finite number", _number)
OBJECT = Rule("an object", lambda v: isinstance(v, dict))
LIST = Rule("a list", lambda v: isinstance(v, list))
SIZE = _pair(1, MAX_SIDE)
OPTION = Rule(f"a number, string, true/false, null or a list of up to {MAX_OPTION_LIST} of these",
              lambda v: _scalar(v) or (isinstance(v, list) and len(v) <= MAX_OPTION_LIST and all(map(_scalar, v))))

DOCUMENT = {  # name: (required, rule)
    "model_name": (True, Rule("a non-empty string", lambda v: isinstance(v, str) and 0 < len(v) <= 1000)),
    "model_options": (True, OBJECT),
    "classes": (True, Rule("a non-empty list of strings",
                           lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(c, str) for c in v))),
    "epoch": (True, NON_NEGATIVE),
    "meta": (True, OBJECT),
    "optimizer": (False, OBJECT),
    "scheduler": (False, OBJECT),
    "rng": (False, OBJECT),
}

META = {  # what the runner (every task) and image classification store and read
    "task": STRING,
    "config": OBJECT,
    "history": Rule("a list of objects, each with an integer \"epoch\" and numbers, strings or nulls",
                    lambda v: isinstance(v, list) and all(isinstance(r, dict) and _int(r.get("epoch"))
                                                          and all(_scalar(x) or isinstance(x, float)  # NaN scores
                                                                  for x in r.values()) for r in v)),
    "channels": _int_in(1, MAX_CHANNELS),
    "n_averaged": NON_NEGATIVE,
    "input_size": SIZE,
    "load_size": optional(SIZE),
}

CONFIG_SPECIAL = {  # config fields whose annotation says less than the code reading them needs
    "model_options": OBJECT,
    "val_fraction": Rule("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    "lr_steps": Rule("a list of [first_epoch, factor] pairs of numbers",
                     lambda v: isinstance(v, list) and all(isinstance(s, list) and len(s) == 2
                                                           and all(map(_number, s)) for s in v)),
    "tta_scales": Rule("a list of integers", lambda v: isinstance(v, list) and all(map(_int, v))),
    "palette": Rule("a list of [r, g, b] lists of integers in 0..255",
                    lambda v: isinstance(v, list) and all(_rgb(c) for c in v)),
}

SCHEDULER = {  # the keys the runner's schedulers compute with after load_state_dict
    "last_epoch": INT,
    "base_lrs": Rule("a list of numbers", lambda v: isinstance(v, list) and all(map(_number, v))),
    "_last_lr": Rule("a list of numbers", lambda v: isinstance(v, list) and all(map(_number, v))),
}


def _rgb(c) -> bool:
    return isinstance(c, list) and len(c) == 3 and all(_int(x) and 0 <= x <= 255 for x in c)


class TaskSchema(NamedTuple):
    """What a task stores beyond the runner's fields, registered by the task's package (so that this
    module, below the tasks, imports none of them): extra ``meta`` rules, closed sub-objects of ``meta``
    (every key known), and the run's configuration class (``--resume`` rebuilds it from ``meta.config``)."""

    meta: Callable[[], dict[str, Rule]]
    sections: Callable[[], dict[str, dict[str, Rule]]]
    config: Callable[[], type]


TASK_SCHEMAS: dict[str, TaskSchema] = {}


def register_task_schema(task: str, schema: TaskSchema) -> None:
    """Called by a task's package when it is imported (``cnnkit.segmentation`` registers "segment")."""
    TASK_SCHEMAS[task] = schema


def _config_rules(task: str) -> dict[str, Rule]:
    """A rule per field of the run's configuration class, from its annotation (resume rebuilds it)."""
    from cnnkit.train.config import TrainConfig, field_type

    cls = TASK_SCHEMAS[task].config() if task in TASK_SCHEMAS else TrainConfig
    return {name: CONFIG_SPECIAL[name] if name in CONFIG_SPECIAL else Rule(*field_type(cls, name))
            for name in typing.get_type_hints(cls)}


# --------------------------------------------------------------------------- 1. the document


def _show(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(source: str, name: str, want: str, found) -> typing.NoReturn:
    raise CheckpointError(f"{source}: metadata field '{name}' must be {want}, found {_show(found)}; {DAMAGED}")


def _check_fields(obj: dict, table: Mapping[str, Rule], prefix: str, source: str, *,
                  required: Sequence[str] = (), closed: bool = False) -> None:
    for name in required:
        if name not in obj:
            raise CheckpointError(f"{source}: metadata field '{prefix}{name}' is missing; {DAMAGED}")
    for name, value in obj.items():
        rule = table.get(name)
        if rule is None and closed:
            raise CheckpointError(f"{source}: metadata field '{prefix}{name}' is not one cnnkit writes "
                                  f"(expected {', '.join(table)}); {DAMAGED}")
        if rule is not None and not rule.ok(value):
            _fail(source, prefix + name, rule.want, value)


def check_document(doc, tensors: Mapping[str, tuple[tuple[int, ...], str]], source: str) -> None:
    """Types, ranges and required keys of a checkpoint's JSON document. ``tensors``: the file's tensor
    names with their (shape, safetensors dtype such as "F32"), read from its header."""
    if not isinstance(doc, dict):
        raise CheckpointError(f"{source}: its 'cnnkit' metadata must be a JSON object, found {_show(doc)}; {DAMAGED}")
    _check_fields(doc, {k: rule for k, (_, rule) in DOCUMENT.items()}, "", source,
                  required=[k for k, (req, _) in DOCUMENT.items() if req])
    _check_fields(doc["model_options"], {k: OPTION for k in doc["model_options"]}, "model_options.", source)
    meta = doc["meta"]
    task = meta.get("task", "classify")
    schema = TASK_SCHEMAS.get(task)
    _check_fields(meta, {**META, **(schema.meta() if schema else {})}, "meta.", source)
    if "config" in meta:
        _check_fields(meta["config"], _config_rules(task), "meta.config.", source)
    for name, table in (schema.sections() if schema else {}).items():
        if isinstance(meta.get(name), dict):
            _check_fields(meta[name], table, f"meta.{name}.", source, closed=True)
    _check_tensors(doc, tensors, source)
    if "optimizer" in doc:
        _check_optimizer(doc["optimizer"], tensors, source)
    if "scheduler" in doc:
        _check_fields(doc["scheduler"], SCHEDULER, "scheduler.", source)
    if "rng" in doc:
        _check_rng(doc["rng"], tensors, source)


def _check_tensors(doc: dict, tensors: Mapping[str, tuple[tuple[int, ...], str]], source: str) -> None:
    """The averaged run's live weights mirror the model's; the mean image is (C, H, W) floats."""
    model = {k[len("model/"):]: shape for k, (shape, _) in tensors.items() if k.startswith("model/")}
    live = {k[len("live/"):]: shape for k, (shape, _) in tensors.items() if k.startswith("live/")}
    if live and live != model:
        first = next(k for k in sorted(set(live) | set(model)) if live.get(k) != model.get(k))
        raise CheckpointError(f"{source}: its live weights do not mirror its model weights (tensor {first!r} "
                              f"differs); {DAMAGED}")
    if "mean_image" in tensors:  # subtracted from the model's inputs: (channels, *input_size)
        shape, dtype = tensors["mean_image"]
        channels, size = doc["meta"].get("channels"), doc["meta"].get("input_size")
        want = (channels or "C", *(size or ("H", "W")))
        if (len(shape) != 3 or dtype not in ("F16", "BF16", "F32", "F64")
                or any(isinstance(w, int) and w != s for w, s in zip(want, shape))):
            raise CheckpointError(f"{source}: its mean image must be {_dims(want)} floats (meta.channels x "
                                  f"meta.input_size), found {dtype} of shape {_dims(shape)}; {DAMAGED}")


def _check_optimizer(doc: dict, tensors: Mapping, source: str) -> None:
    groups = Rule("a list of objects, each with \"params\": a list of parameter numbers",
                  lambda v: isinstance(v, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                        and all(map(NON_NEGATIVE.ok, g["params"])) for g in v))
    _check_fields(doc, {"param_groups": groups, "state": OBJECT}, "optimizer.", source,
                  required=("param_groups", "state"))
    entry = Rule("{\"tensor\": NAME} naming an optim/ tensor of the file, or {\"value\": VALUE}",
                 lambda v: isinstance(v, dict) and len(v) == 1 and (
                     ("tensor" in v and isinstance(v["tensor"], str) and v["tensor"].startswith("optim/")
                      and v["tensor"] in tensors) or "value" in v))
    for pid, buffers in doc["state"].items():
        if not (pid.isascii() and pid.isdigit() and len(pid) < 19):
            _fail(source, "optimizer.state", "an object keyed by parameter numbers", pid)
        if not isinstance(buffers, dict):
            _fail(source, f"optimizer.state.{pid}", OBJECT.want, buffers)
        _check_fields(buffers, {k: entry for k in buffers}, f"optimizer.state.{pid}.", source)


def _check_rng(doc: dict, tensors: Mapping, source: str) -> None:
    numpy = Rule(f"[\"MT19937\", position 0..{NUMPY_KEYS}, has_gauss 0 or 1, cached gauss]",
                 lambda v: isinstance(v, list) and len(v) == 4 and v[0] == "MT19937" and _int(v[1])
                 and 0 <= v[1] <= NUMPY_KEYS and v[2] in (0, 1) and _int(v[2]) and _number(v[3]))
    python = Rule(f"[3, {NUMPY_KEYS + 1} integers (the state words and position), gauss or null]",
                  lambda v: isinstance(v, list) and len(v) == 3 and v[0] == 3 and isinstance(v[1], list)
                  and len(v[1]) == NUMPY_KEYS + 1 and all(_int(w) and 0 <= w < 2**32 for w in v[1])
                  and v[1][-1] <= NUMPY_KEYS and (v[2] is None or _number(v[2])))
    _check_fields(doc, {"numpy": numpy, "python": python}, "rng.", source, required=("numpy", "python"))
    torch_bytes = torch.get_rng_state().numel()
    wanted = {"rng/torch": ((torch_bytes,), ("U8",)), "rng/numpy_keys": ((NUMPY_KEYS,), ("I64", "U32", "I32"))}
    for name, (shape, dtypes) in wanted.items():
        if name not in tensors or tuple(tensors[name][0]) != shape or tensors[name][1] not in dtypes:
            found = "nothing" if name not in tensors else f"{tensors[name][1]} of shape {list(tensors[name][0])}"
            raise CheckpointError(f"{source}: its RNG state needs tensor {name!r} of {shape[0]} {dtypes[0]} values, "
                                  f"found {found}; {DAMAGED}")


# --------------------------------------------------------------------------- 2. the model


def max_params() -> int:
    """The most parameters a model built from a checkpoint may have: $CNNKIT_MAX_PARAMS, default 2e9."""
    text = os.environ.get(MAX_PARAMS_ENV)
    if text is None or not text.strip():
        return DEFAULT_MAX_PARAMS
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        value = 0
    if value < 1:
        raise ConfigError(f"{MAX_PARAMS_ENV} must be a positive number of parameters (e.g. 5e9), got {text!r}; "
                          f"unset it for the default {DEFAULT_MAX_PARAMS:.0e}")
    return value


def _dims(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "a scalar"


def check_model_plan(build: Callable[[], nn.Module], stored: Mapping[str, Sequence[int]], source: str,
                     name: str) -> None:
    """Build the model on the meta device (no memory), refuse it above ``max_params()``, and require the
    ``stored`` weights (name -> shape) to be exactly its state's names and shapes."""
    limit = max_params()
    try:
        with torch.device("meta"):
            model = build()
    except CnnkitError as exc:
        raise CheckpointError(f"{source}: its model {name!r} cannot be built: {_first_line(exc)}; {DAMAGED}") from None
    except Exception as exc:  # noqa: BLE001 - any builder failure on the file's options is the file's fault
        raise CheckpointError(f"{source}: its model {name!r} cannot be built with its options "
                              f"({type(exc).__name__}: {_first_line(exc)}); {DAMAGED}") from None
    count = sum(p.numel() for p in model.parameters())
    if count > limit:
        raise CheckpointError(f"{source}: its model {name!r} has {count:,} parameters, above the limit of {limit:,}; "
                              f"{DAMAGED}, or pass `cnnkit --max-params {count} ...` (or set {MAX_PARAMS_ENV}={count}) "
                              "if you trust it and have the memory")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in expected.items():
        if key not in stored:
            raise CheckpointError(f"{source} does not fit this model ({name}): it lacks parameter {key!r} "
                                  f"({_dims(shape)}); {DAMAGED}")
        if tuple(stored[key]) != shape:
            raise CheckpointError(f"{source} does not fit this model ({name}): parameter {key!r} is stored as "
                                  f"{_dims(stored[key])} but the model's is {_dims(shape)}; {DAMAGED}")
    extra = [k for k in stored if k not in expected]
    if extra:
        raise CheckpointError(f"{source} does not fit this model ({name}): it holds parameter {extra[0]!r}, which "
                              f"the model lacks; {DAMAGED}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= 160 else line[:157] + "..."


# --------------------------------------------------------------------------- 3. agreement


def check_consistency(doc: dict, source: str) -> None:
    """Fields that must agree: the model's outputs and the class names, the positive class, and the run's
    configuration (which ``--resume`` rebuilds the model from) and the model the file holds."""
    classes, options, meta = doc["classes"], doc["model_options"], doc["meta"]
    k = options.get("num_classes")
    if k is not None and k != len(classes):
        raise CheckpointError(f"{source}: its model has {_show(k)} outputs (model_options.num_classes) but it names "
                              f"{len(classes)} classes; {DAMAGED}")
    positive = meta.get("positive_class")
    if meta.get("task") == "segment" and positive is not None and positive >= len(classes):
        _fail(source, "meta.positive_class", f"a class index below {len(classes)}", positive)
    config = meta.get("config", {})
    if config.get("model", doc["model_name"]) != doc["model_name"]:
        _fail(source, "meta.config.model", f"the model the file holds, {_show(doc['model_name'])}", config["model"])
    # the builder options the runner sets from the data (classes, channels, dropout) may differ from the config's
    for key, value in config.get("model_options", {}).items():
        if key not in ("num_classes", "in_chans", "dropout") and options.get(key) != value:
            _fail(source, f"meta.config.model_options.{key}", f"the model's, {_show(options.get(key))}", value)
