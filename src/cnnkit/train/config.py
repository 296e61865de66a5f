"""The configuration of a training run: :class:`TrainConfig`, read from and written to TOML (or YAML).

Precedence when the CLI builds one: defaults < recipe (``--recipe``) < config file (``--config``) <
command-line flags. The resolved configuration is saved in the run folder as ``config.toml`` (readable
by ``--config``) and ``args.json``.
"""

from __future__ import annotations

import difflib
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from cnnkit.errors import ConfigError

SCHEDULES = ("step", "plateau", "piecewise", "cosine", "none")
OPTIMIZERS = ("sgd", "adam")
MEAN_MODES = ("image", "channel")
WEIGHT_AVERAGES = ("none", "polyak", "ema")


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved as ``args.json`` / ``config.toml`` and inside every checkpoint."""

    data: str = "digits"
    model: str = "lenet5"
    model_options: dict = field(default_factory=dict)  # extra builder options, e.g. {"aux_logits": True}
    out: str = "runs/train"
    epochs: int = 20
    batch_size: int = 64  # the global batch: split over the processes of a distributed run
    lr: float = 0.05
    optimizer: str = "sgd"  # "sgd" (with momentum, the papers') or "adam"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    step_size: int = 8  # epochs between learning-rate drops (schedule "step")
    gamma: float = 0.1  # learning-rate factor at each drop (step and plateau)
    patience: int = 2  # epochs without improvement before a drop (schedule "plateau")
    dropout: float = 0.0
    input_size: tuple[int, int] | None = None  # (H, W); default: the model's native size
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    skip_bad_files: bool = False
    # --- the papers' details
    recipe: str | None = None  # the recipe the values started from (informative)
    load_size: tuple[int, int] | None = None  # (H, W) images are loaded at; default: input_size
    augment: str = ""  # e.g. "crop,flip,pca=0.1" (see cnnkit.data.augment)
    mean: str = "image"  # "image": per-pixel mean image; "channel": per-channel mean (VGG)
    loss: str = "softmax"  # or "ranking-hinge" (Chatfield et al. 2014)
    aux_weight: float = 0.3  # weight of each auxiliary classifier's loss (GoogLeNet)
    l2_features: bool = False  # the last layer reads L2-normalised features
    plateau_metric: str = "loss"  # "loss" or "error": what schedule "plateau" watches on held-out data
    lr_steps: list = field(default_factory=list)  # [[first_epoch, factor], ...] for schedule "piecewise"
    weight_average: str = "none"  # "polyak" (mean of the iterates) or "ema" (exponential moving average)
    average_start: int = 1  # first epoch whose steps enter the average
    ema_decay: float = 0.9999
    tta: str = "center"  # test protocol after training: center, 10crop or multiscale
    tta_scales: list = field(default_factory=list)  # Q values for multiscale
    # --- speed (opt-in)
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; fp16 with a GradScaler)
    compile: bool = False  # torch.compile the model
    channels_last: bool = False

    def validate(self) -> None:
        from cnnkit.train.losses import LOSSES
        from cnnkit.train.tta import TTA_MODES

        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got "
             f"{self.optimizer!r}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.step_size >= 1, f"--step-size must be at least 1, got {self.step_size}"),
            (0 < self.gamma <= 1, f"--gamma must be in (0, 1], got {self.gamma}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (0 < self.val_fraction < 1, f"--val-fraction must be in (0, 1), got {self.val_fraction}"),
            (0 <= self.seed < 2**32, f"--seed must be a whole number in [0, 2^32), got {self.seed}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.mean in MEAN_MODES, f"--mean must be one of {', '.join(MEAN_MODES)}, got {self.mean!r}"),
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (self.aux_weight >= 0, f"--aux-weight must be >= 0, got {self.aux_weight}"),
            (self.plateau_metric in ("loss", "error"), "plateau_metric must be 'loss' or 'error'"),
            (self.weight_average in WEIGHT_AVERAGES,
             f"--weight-average must be one of {', '.join(WEIGHT_AVERAGES)}, got {self.weight_average!r}"),
            (0 < self.ema_decay < 1, f"--ema-decay must be in (0, 1), got {self.ema_decay}"),
            (self.tta in TTA_MODES, f"--tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}"),
            (self.tta != "multiscale" or bool(self.tta_scales), "--tta multiscale needs --scales"),
            (self.precision in ("fp32", "bf16", "fp16"), f"--precision must be fp32, bf16 or fp16, got "
             f"{self.precision!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.schedule == "piecewise":
            steps = self.lr_steps
            if not steps or not all(_is_step(s) for s in steps):
                raise ConfigError("schedule 'piecewise' needs lr_steps = [[first_epoch, factor], ...] with "
                                  "epochs >= 1 and factors > 0, e.g. [[1, 1.0], [3, 0.4]]")
        for name, value in asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        self.check_model()

    def check_model(self) -> None:
        """An unknown model name is a ConfigError (raised before anything is built or written)."""
        from cnnkit.models import model_info

        model_info(self.model)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """A config of this class from a dict (unknown keys, e.g. another task's, are left out)."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        for name in ("input_size", "load_size"):
            value = getattr(cfg, name)
            if value is not None:
                setattr(cfg, name, parse_size(value, name))
        cfg.lr_steps = [list(s) if isinstance(s, (list, tuple)) else s for s in cfg.lr_steps]
        if not all(isinstance(q, int) and not isinstance(q, bool) and q >= 1 for q in cfg.tta_scales):
            raise ConfigError(f"tta_scales (--scales) must be whole numbers >= 1, got {cfg.tta_scales}")
        return cfg


def _is_step(step) -> bool:
    """[first_epoch, factor] of a piecewise schedule: a whole epoch >= 1 and a factor > 0."""
    return (isinstance(step, list) and len(step) == 2 and all(_is_number(v) for v in step)
            and float(step[0]).is_integer() and step[0] >= 1 and math.isfinite(step[1]) and step[1] > 0)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_size(value, name: str = "size") -> tuple[int, int]:
    """32, '32', '32x48', [32, 48] -> (H, W)."""
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.lower().split("x")]
        elif isinstance(value, int):
            parts = [value]
        else:
            parts = [int(p) for p in value]
    except (TypeError, ValueError):
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise ConfigError(f"{name} must look like 32 or 32x48 (H x W), got {value!r}")
    return parts[0], parts[1]


# --------------------------------------------------------------------------- files


def read_config_file(path: str | Path, cls: type = TrainConfig) -> dict:
    """The settings of a TOML (.toml) or YAML (.yaml/.yml, needs PyYAML) file, keys as TrainConfig fields.

    A ``recipe`` key names the recipe the file starts from. Unknown keys are an error.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a .toml (or .yaml) file")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: YAML needs PyYAML (pip install pyyaml); or write the file as TOML"
                              ) from None
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    else:
        doc = _load_toml(text, path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold key = value settings at the top level")
    known = {f.name for f in fields(cls)}
    settings = {}
    for key, value in doc.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{path}: unknown setting {key!r}{hint}; see `cnnkit train --help`")
        _check_type(path, name, value, cls)
        settings[name] = value
    return settings


_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string in quotes",
               list: "a list [...]", dict: "a table { key = value }"}


def field_type(cls: type, name: str) -> tuple[str, typing.Callable[[object], bool]]:
    """What setting ``name`` of config class ``cls`` must be, in words, and a test of a value: both from the
    field's annotation (a size may be 32, "32x48" or [32, 48]; ``X | None`` also takes None). Shared by
    config files (``read_config_file``) and checkpoints' stored configuration (``checkpoint_schema``)."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    kinds = [k for k in args if k is not type(None)] or [hint]

    def kind_ok(kind, value) -> bool:
        if typing.get_origin(kind) is tuple:  # parse_size checks the rest
            return isinstance(value, (str, list)) or (isinstance(value, int) and not isinstance(value, bool))
        if kind is float:
            return _is_number(value)
        if kind is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, kind)

    def ok(value) -> bool:
        return (value is None and type(None) in args) or any(kind_ok(k, value) for k in kinds)

    wanted = " or ".join("a size (32 or \"32x48\")" if typing.get_origin(k) is tuple else _TYPE_NAMES.get(k, k.__name__)
                         for k in kinds)
    return wanted, ok


def _check_type(path: Path, name: str, value, cls: type) -> None:
    """A setting of the wrong type (``momentum = "high"``) is one line naming the file, the key and an example,
    before anything is built. Values are checked further (ranges) by ``validate``."""
    wanted, ok = field_type(cls, name)
    if ok(value):
        return
    default = getattr(cls(), name)
    example = f" (e.g. {name} = {_toml_value(default)})" if default not in (None, [], {}, "") else ""
    try:
        shown = _toml_value(value)
    except TypeError:  # YAML can hold dates and other values TOML writes differently
        shown = repr(value)
    raise ConfigError(f"{path}: {name} = {shown} must be {wanted}{example}; fix it in the file")


def _load_toml(text: str, path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(f"{path}: reading TOML on Python 3.10 needs tomli (pip install tomli)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc})") from None


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(cfg: TrainConfig, header: str = "") -> str:
    """The configuration as TOML that ``--config`` reads back (unset sizes are written as comments)."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    for key, value in asdict(cfg).items():
        lines.append(f"# {key} = (unset: the default)" if value is None else f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
