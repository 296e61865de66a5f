"""Component ablations: a grid of overrides, each cell trained separately, in one table and plot.

The lecture's "Investigate components of CNNs" (Chatfield et al., BMVC 2014; Zeiler & Fergus's
Clarifai study) varies kernel size, number of channels, stride, the dimension of the fully connected
layers, data augmentation and model averaging. Here any of them is an axis of a grid:

- a key the model's builder takes (``small_cnn``: kernel_size, channels, stride, padding, fc_width);
- a key of :class:`~cnnkit.train.runner.TrainConfig` (lr, epochs, dropout, batch_size, ... and any
  field added later, such as a data-augmentation setting), found by name;
- ``average``: the number of models whose softmax posteriors are averaged on the held-out split.
  The members differ only in their random initialisation (the model's ``init_seed`` option), as in
  "model averaging leads to improvement (random initialization)"; member m of a cell is shared by
  every ``average`` value, so ``average=1,3`` trains 3 networks per cell, not 4.

Each network is a ``runner.fit`` run folder under ``out/runs/``; ``results.json`` records every
finished network and cell. A rerun skips what is finished and resumes an interrupted network from
its last epoch (``fit(resume=True)``).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cnnkit.analysis.study import ResultStore, cell_bar, write_tables
from cnnkit.data import labels_of, load_dataset
from cnnkit.errors import ConfigError
from cnnkit.models import model_info
from cnnkit.train.checkpoint import load_checkpoint
from cnnkit.train.engine import predict_proba
from cnnkit.train.runner import TrainConfig, build_model, fit, model_channels
from cnnkit.utils import resolve_device

log = logging.getLogger(__name__)

AVERAGE = "average"
NOT_AXES = {"out", "model_options", "device", "workers"}  # where and how, not what is trained
BUILDER_FIXED = {"num_classes", "in_chans"}  # set from the data


@dataclass
class AblateConfig:
    """The base run (every cell starts from it) and the grid of overrides."""

    base: TrainConfig = field(default_factory=lambda: TrainConfig(model="small_cnn", epochs=6, lr=0.05,
                                                                  schedule="step", step_size=4))
    grid: dict[str, list] = field(default_factory=dict)
    out: str = "runs/ablate"


# --------------------------------------------------------------------------- keys and values


def train_fields() -> dict[str, object]:
    """TrainConfig fields a grid may vary, with their defaults (the type a value is parsed to)."""
    defaults = TrainConfig()
    return {f.name: getattr(defaults, f.name) for f in fields(TrainConfig) if f.name not in NOT_AXES}


def model_options(model: str) -> dict[str, object]:
    params = inspect.signature(model_info(model).builder).parameters
    return {n: p.default for n, p in params.items() if n not in BUILDER_FIXED}


def key_kind(key: str, models: list[str]) -> str:
    """"average", "train" (a TrainConfig field, which wins over a builder option of the same name) or "model"."""
    if key == AVERAGE:
        return AVERAGE
    if key in train_fields():
        return "train"
    missing = [m for m in models if key not in model_options(m)]
    if not missing:
        return "model"
    options = sorted(set(model_options(missing[0])))
    raise ConfigError(f"unknown grid key {key!r} for model {missing[0]}; use average, a training setting "
                      f"({', '.join(sorted(train_fields()))}) or a model option ({', '.join(options)})")


def parse_value(text: str, default, key: str):
    """``text`` as the type of ``default``; lists of ints are written with '/' (channels=16/32)."""
    text = text.strip()
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if "/" in text:
            return [int(t) for t in text.split("/")]
        if isinstance(default, (int, tuple, list)) or key == AVERAGE:
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        for kind in (int, float):  # a default of None: the most specific number, else the text
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    except ValueError:
        kind = "true/false" if isinstance(default, bool) else type(default).__name__
        raise ConfigError(f"grid value {key}={text!r} is not a {kind}; e.g. {key}={default}") from None


def parse_grid(items: list[str], model: str) -> dict[str, list]:
    """["kernel_size=3,5", "average=1,3"] -> {"kernel_size": [3, 5], "average": [1, 3]}, typed and checked."""
    grid: dict[str, list] = {}
    raw = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not values.strip():
            raise ConfigError(f"grid entry {item!r} must look like KEY=V1,V2 (e.g. kernel_size=3,5)")
        if key in grid or key in dict(raw):
            raise ConfigError(f"grid key {key!r} is given twice; list all its values once: {key}=V1,V2")
        raw.append((key, [v for v in values.split(",") if v.strip()]))
    models = [v.strip() for v in dict(raw).get("model", [model])]
    for name in models:
        model_info(name)  # unknown model -> ConfigError
    for key, values in raw:
        kind = key_kind(key, models)
        default = (1 if kind == AVERAGE else train_fields()[key] if kind == "train"
                   else model_options(models[0])[key])
        parsed = [parse_value(v, default, key) for v in values]
        if len(set(map(str, parsed))) != len(parsed):
            raise ConfigError(f"grid key {key!r} lists a value twice ({', '.join(values)})")
        if kind == AVERAGE and any(k < 1 for k in parsed):
            raise ConfigError(f"average={','.join(values)}: the number of averaged models must be at least 1")
        grid[key] = parsed
    return grid


# --------------------------------------------------------------------------- cells and networks


def cells_of(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def cell_id(cell: dict) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in cell.items()) or "base"


def _fmt(value) -> str:
    return "/".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def member_config(base: TrainConfig, cell: dict, member: int, out: Path) -> TrainConfig:
    """The TrainConfig of member ``member`` of ``cell`` (its folder is named after what it varies)."""
    cfg = copy.deepcopy(base)
    models = [cell.get("model", base.model)]
    options = dict(base.model_options)
    for key, value in cell.items():
        kind = key_kind(key, models)
        if kind == "train":
            setattr(cfg, key, tuple(value) if key == "input_size" else value)
        elif kind == "model":
            options[key] = value
    if "init_seed" in model_options(cfg.model):
        options["init_seed"] = cfg.seed * 1000 + member
    elif member > 0:
        raise ConfigError(f"model averaging needs members that differ in their initialisation, and {cfg.model} "
                          "has no init_seed option; use small_cnn or drop the average axis")
    cfg.model_options = options
    varied = {k: v for k, v in cell.items() if k != AVERAGE}
    name = re.sub(r"[^A-Za-z0-9=.,_-]+", "_", "_".join(f"{k}={_fmt(v)}" for k, v in varied.items()) or "base")
    if len(name) > 80:
        name = name[:60] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    cfg.out = str(out / "runs" / f"{name}_m{member}")
    return cfg


def check_cell(cfg: TrainConfig) -> None:
    """Fail before any training: bad values and impossible architectures (built on the meta device)."""
    cfg.validate()
    info = model_info(cfg.model)
    with torch.device("meta"):
        build_model(cfg.model, info.num_classes, model_channels(cfg.model) or info.input_size[0], cfg.dropout,
                    cfg.model_options)


# --------------------------------------------------------------------------- the study


def run_ablation(cfg: AblateConfig, *, progress: bool | None = None) -> dict:
    """Train every network of the grid that is not finished, evaluate every cell, write table and plot."""
    if not cfg.grid:
        raise ConfigError("the grid is empty; give at least one KEY=V1,V2 (e.g. kernel_size=3,5)")
    out = Path(cfg.out)
    cells = cells_of(cfg.grid)
    plans = []
    for cell in cells:
        members = [member_config(cfg.base, cell, m, out) for m in range(cell.get(AVERAGE, 1))]
        for member in members:
            check_cell(member)
        plans.append((cell, members))
    base = {k: v for k, v in asdict(cfg.base).items() if k not in NOT_AXES}
    store = ResultStore(out, "ablate", {"base": base, "grid": cfg.grid})
    device = resolve_device(cfg.base.device)
    done = sum(store.done(f"cell {cell_id(c)}") for c in cells)
    log.info("ablation in %s: %d cells, %d networks (%d cells finished)", out, len(cells),
             len({m.out for _, ms in plans for m in ms}), done)
    bar = cell_bar(len(cells), done, "ablate", progress)
    trained = 0
    try:
        for cell, members in plans:
            key = f"cell {cell_id(cell)}"
            if store.done(key):
                continue
            t0 = time.perf_counter()
            for member in members:
                _train_member(member, store, device)
            result = evaluate_average(members, device)
            result["seconds"] = round(time.perf_counter() - t0, 3)
            store.record(key, {**result, "cell": cell})
            trained += 1
            bar.update()
            log.info("%s: top-1 %.4f (single models %.4f +- %.4f, %d averaged)  (%.1fs)", cell_id(cell),
                     result["acc1"], result["single_acc1_mean"], result["single_acc1_std"], len(members),
                     result["seconds"])
    finally:
        bar.close()
    rows = [store.cells[f"cell {cell_id(c)}"] for c in cells]
    md, csv_path, png = write_ablation_report(out, cfg.grid, rows)
    return {"cells": rows, "trained": trained, "out": str(out), "table_md": str(md), "table_csv": str(csv_path),
            "plot": str(png)}


def _train_member(cfg: TrainConfig, store: ResultStore, device: torch.device) -> None:
    key = f"net {Path(cfg.out).name}"
    if store.done(key) and (Path(cfg.out) / "last.safetensors").exists():
        return
    last = Path(cfg.out) / "last.safetensors"
    if last.exists():  # an interrupted network: continue it, if it is this network
        saved = load_checkpoint(last).meta.get("config", {})
        ours = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in NOT_AXES | {"epochs"}}
        diff = sorted(k for k in ours if k in saved and saved[k] != ours[k])
        if diff:
            raise ConfigError(f"{cfg.out} holds a network trained with other settings ({diff[0]}: {saved[diff[0]]!r} "
                              f"there, {ours[diff[0]]!r} now); delete that folder or choose another --out")
    summary = fit(cfg, resume=last.exists(), progress=False)
    store.record(key, {"acc1": summary["final"]["val_acc1"], "epochs": summary["epochs"]})


def evaluate_average(members: list[TrainConfig], device: torch.device) -> dict:
    """Top-1 accuracy of the mean softmax posterior of the members' final networks on the held-out split."""
    first = members[0]
    size = tuple(first.input_size) if first.input_size else model_info(first.model).input_size[1:]
    splits = load_dataset(first.data, size, channels=model_channels(first.model), val_fraction=first.val_fraction,
                          seed=first.seed)
    labels = labels_of(splits.val)
    posteriors = []
    for member in members:
        ckpt = load_checkpoint(Path(member.out) / "last.safetensors", map_location=device)
        model = ckpt.build_model().to(device)
        batches = DataLoader(splits.val, batch_size=256, shuffle=False)
        posteriors.append(torch.cat([predict_proba(model, x, mean=ckpt.mean_image) for x, _ in batches]))
    single = torch.tensor([float((p.argmax(1) == labels).double().mean()) for p in posteriors])
    mean_posterior = torch.stack(posteriors).mean(0)  # (N, K): the averaged model's posterior
    nll = F.nll_loss(mean_posterior.clamp_min(1e-12).log(), labels)
    return {"acc1": float((mean_posterior.argmax(1) == labels).double().mean()), "nll": float(nll),
            "single_acc1_mean": float(single.mean()),
            "single_acc1_std": float(single.std()) if len(single) > 1 else 0.0,
            "members": len(members), "images": len(labels)}


def write_ablation_report(out: Path, grid: dict[str, list], rows: list[dict]):
    """ablation.md / ablation.csv (one row per cell) and ablation.png (grouped bars of top-1 error)."""
    from cnnkit.train.plots import plt, save_figure

    keys = list(grid)
    header = [*keys, "top-1", "top-1 error", "single-model top-1", "single-model std", "NLL", "seconds"]
    table = [[*(_fmt(r["cell"][k]) for k in keys), r["acc1"], 1 - r["acc1"], r["single_acc1_mean"],
              r["single_acc1_std"], r["nll"], f"{r['seconds']:.1f}"] for r in rows]
    md, csv_path = write_tables(out, "ablation", header, table,
                                title="Held-out top-1 accuracy of each cell (averaged models: mean posterior)")

    series_key = AVERAGE if AVERAGE in grid else keys[-1]
    group_keys = [k for k in keys if k != series_key]
    groups = list(dict.fromkeys(" ".join(f"{k}={_fmt(r['cell'][k])}" for k in group_keys) or "all" for r in rows))
    series = grid[series_key]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(series) / 2)), 4.2))
    for s, value in enumerate(series):
        xs, ys = [], []
        for r in rows:
            if r["cell"][series_key] == value:
                group = " ".join(f"{k}={_fmt(r['cell'][k])}" for k in group_keys) or "all"
                xs.append(groups.index(group) + (s - (len(series) - 1) / 2) * width)
                ys.append(100 * (1 - r["acc1"]))
        ax.bar(xs, ys, width * 0.95, label=f"{series_key}={_fmt(value)}")
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 4 else 0, ha="right" if
                  len(groups) > 4 else "center", fontsize=8)
    top = max(100 * (1 - r["acc1"]) for r in rows)
    ax.set(ylabel="held-out top-1 error (%)", ylim=(0, max(1.0, 1.2 * top + 0.5)),
           title="component ablation (Chatfield et al. 2014 style)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    png = out / "ablation.png"
    save_figure(fig, png)
    return md, csv_path, png


def apply_settings(base: TrainConfig, items: list[str]) -> TrainConfig:
    """``["lr=0.02", "channels=8"]`` applied to a copy of ``base`` (training settings or model options)."""
    cfg = copy.deepcopy(base)
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or key == AVERAGE:
            raise ConfigError(f"--set {item!r} must be KEY=VALUE with KEY a training setting or model option "
                              "(average belongs in --grid)")
        pairs.append((key, value))
    for key, value in sorted(pairs, key=lambda kv: kv[0] != "model"):  # the model first: options depend on it
        kind = key_kind(key, [cfg.model])
        if kind == "train":
            parsed = parse_value(value, train_fields()[key], key)
            setattr(cfg, key, tuple(parsed) if key == "input_size" else parsed)
        else:
            cfg.model_options = {**cfg.model_options, key: parse_value(value, model_options(cfg.model)[key], key)}
    return cfg
