"""How transferable are features? The study of Yosinski, Clune, Bengio, Lipson (NIPS 2014).

The classes of a dataset are split into two halves A and B, and two base networks, baseA and baseB,
are trained on them. Then, for every layer n = 1 .. L-1 (L weighted layers; the output layer is
task specific and never copied, as in the paper's n = 1..7 for an 8-layer AlexNet):

- BnB  (selffer, the control): the first n layers copied from baseB and frozen, the layers above
  re-initialised and trained on B;
- AnB  (transfer): the first n layers copied from baseA and frozen, the rest re-initialised and
  trained on B;
- BnB+ and AnB+: the same, but every layer learns (fine-tuning).

Every network is evaluated on B's held-out images. A "layer" is a weighted layer (Conv/Linear) with
the parameter-holding layers that follow it before the next one (e.g. a BatchNorm); pooling and
activations have no weights and come along for free. Frozen layers are excluded from the optimiser
and their normalisation layers run in eval mode, so their weights and statistics stay bit for bit.

Results go to ``out``: ``results.json`` (one entry per finished cell, see ``study.ResultStore``),
``baseA.safetensors`` and ``baseB.safetensors``, ``transfer.md``/``transfer.csv`` and ``transfer.png``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from cnnkit.analysis.study import ResultStore, cell_bar, write_tables
from cnnkit.data import Splits, compute_mean_image, load_dataset
from cnnkit.errors import ConfigError
from cnnkit.models import model_info
from cnnkit.train.checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
from cnnkit.train.engine import evaluate, train_one_epoch
from cnnkit.train.runner import build_model, model_channels
from cnnkit.utils import resolve_device, seed_everything

log = logging.getLogger(__name__)

KINDS = ("BnB", "BnB+", "AnB", "AnB+")
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class TransferConfig:
    """Settings of a transfer study; every field but ``out``/``device`` must match to resume one."""

    data: str = "digits"
    model: str = "small_cnn"
    model_options: dict = field(default_factory=dict)
    split_a: list[str] | None = None  # class names or indices; None: a random half (split_seed)
    split_b: list[str] | None = None  # None: the classes not in A
    split_seed: int = 0
    epochs: int = 6
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    val_fraction: float = 0.2
    seed: int = 0
    out: str = "runs/transfer"
    device: str = "auto"


# --------------------------------------------------------------------------- classes A and B


def split_classes(classes: list[str], split_a=None, split_b=None, seed: int = 0) -> tuple[list[int], list[int]]:
    """Class indices (A, B). Lists hold class names or indices; missing halves are drawn or completed."""

    def resolve(tokens, flag) -> list[int]:
        out = []
        for token in tokens:
            token = str(token).strip()
            if token in classes:
                out.append(classes.index(token))
            elif token.lstrip("-").isdigit() and 0 <= int(token) < len(classes):
                out.append(int(token))
            else:
                raise ConfigError(f"{flag} names class {token!r}, which the data does not have; "
                                  f"classes: {', '.join(classes[:20])}")
        if not out:
            raise ConfigError(f"{flag} is empty; give at least one class")
        if len(set(out)) != len(out):
            raise ConfigError(f"{flag} lists a class twice ({', '.join(map(str, tokens))})")
        return sorted(out)

    if len(classes) < 2:
        raise ConfigError("a transfer study needs at least 2 classes (A and B)")
    a = resolve(split_a, "--split-a") if split_a is not None else None
    b = resolve(split_b, "--split-b") if split_b is not None else None
    if a is None and b is None:
        perm = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed)).tolist()
        a, b = sorted(perm[: len(classes) // 2]), sorted(perm[len(classes) // 2:])
    elif a is None or b is None:
        given = a if a is not None else b
        rest = [i for i in range(len(classes)) if i not in given]
        if not rest:
            raise ConfigError("one class list holds every class, leaving none for the other; give fewer classes")
        a, b = (given, rest) if a is not None else (rest, given)
    overlap = sorted(set(a) & set(b))
    if overlap:
        raise ConfigError(f"--split-a and --split-b overlap in class(es) {', '.join(classes[i] for i in overlap)}; "
                          "A and B must be disjoint")
    return a, b


def class_subset(dataset, keep: list[int]):
    """The items of ``dataset`` whose class is in ``keep``, relabelled 0..len(keep)-1 in that order."""
    if not hasattr(dataset, "subset"):
        raise ConfigError(f"{type(dataset).__name__} cannot be split by class; use a cnnkit dataset")
    remap = torch.full((len(dataset.classes),), -1, dtype=torch.long)
    remap[torch.tensor(keep)] = torch.arange(len(keep))
    index = torch.nonzero(remap[dataset.labels] >= 0).flatten()
    sub = dataset.subset(index)
    sub.labels = remap[sub.labels]
    sub.classes = [dataset.classes[i] for i in keep]
    return sub


# --------------------------------------------------------------------------- layers: copy and freeze


def weighted_layers(model: nn.Module) -> list[list[str]]:
    """Module names grouped per weighted layer, in forward order of registration.

    Each group starts with a Conv/Linear and holds the parameter- or buffer-holding leaf modules after
    it (normalisation layers) up to the next weighted one.
    """
    groups: list[list[str]] = []
    for name, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue
        if isinstance(m, WEIGHTED):
            groups.append([name])
        elif next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None:
            if not groups:
                raise ConfigError(f"layer {name!r} holds weights before the first conv/linear layer; "
                                  "the transfer study cannot assign it to a layer")
            groups[-1].append(name)
    if len(groups) < 2:
        raise ConfigError(f"the model has {len(groups)} weighted layer(s); a transfer study needs at least 2")
    return groups


def _eval_mode_hook(module: nn.Module, _inputs) -> None:
    module.train(False)  # a frozen BatchNorm uses, and keeps, its running statistics


def transplant(target: nn.Module, source: nn.Module, n: int, *, freeze: bool) -> list[str]:
    """Copy the first ``n`` weighted layers of ``source`` into ``target``; freeze them on request.

    Returns the copied module names. The layers above keep ``target``'s (fresh) initialisation.
    """
    groups = weighted_layers(target)
    if not 1 <= n < len(groups):
        raise ConfigError(f"n={n} is out of range: the model has {len(groups)} weighted layers, "
                          f"n runs from 1 to {len(groups) - 1}")
    src, dst = dict(source.named_modules()), dict(target.named_modules())
    names = [name for group in groups[:n] for name in group]
    for name in names:
        load_weights(dst[name], src[name].state_dict(), source=f"base layer {name}")
        if freeze:
            for p in dst[name].parameters():
                p.requires_grad_(False)
            dst[name].register_forward_pre_hook(_eval_mode_hook)
    return names


# --------------------------------------------------------------------------- one training


def _loader(dataset, cfg: TransferConfig, seed: int, epoch: int, shuffle: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)  # batch order: (seed, epoch) only
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=shuffle, generator=generator)


def train_network(model: nn.Module, train, val, cfg: TransferConfig, *, seed: int, mean: torch.Tensor,
                  device: torch.device) -> dict:
    """SGD with momentum and a cosine schedule on the trainable parameters; held-out metrics at the end."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    num_classes = len(train.classes)
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        train_one_epoch(model, _loader(train, cfg, seed, epoch, True), optimizer, device=device,
                        num_classes=num_classes, mean=mean, epoch=epoch, progress=False)
        scheduler.step()
    metrics, _ = evaluate(model, _loader(val, cfg, seed, 0, False), device=device, num_classes=num_classes,
                          mean=mean, progress=False)
    return {"acc1": metrics["acc1"], "loss": metrics["loss"], "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------- the study


@dataclass
class _Task:
    """Data of one side of the study (A or B)."""

    classes: list[str]
    train: object
    val: object


def _cell_seed(cfg: TransferConfig, key: str) -> int:
    """baseA and baseB get their own seeds; the four networks at layer n share one (a paired design):
    the same fresh weights above layer n and the same batch order, so that their differences come from
    the copied layers and from freezing alone."""
    if key.startswith("base"):
        return cfg.seed * 1000 + (0 if key == "baseA" else 1)
    return cfg.seed * 1000 + 1 + int(key.split("/")[1])


def run_transfer(cfg: TransferConfig, *, progress: bool | None = None) -> dict:
    """Run (or continue) the study; returns {"cells", "layers", "A", "B", paths}."""
    device = resolve_device(cfg.device)
    info = model_info(cfg.model)
    splits: Splits = load_dataset(cfg.data, info.input_size[1:], channels=model_channels(cfg.model),
                                  val_fraction=cfg.val_fraction, seed=cfg.seed)
    a_idx, b_idx = split_classes(splits.classes, cfg.split_a, cfg.split_b, cfg.split_seed)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "device")}
    settings.update(split_a=[splits.classes[i] for i in a_idx], split_b=[splits.classes[i] for i in b_idx])
    store = ResultStore(cfg.out, "transfer", settings)
    out = store.out
    tasks = {side: _Task([splits.classes[i] for i in idx], class_subset(splits.train, idx),
                         class_subset(splits.val, idx)) for side, idx in (("A", a_idx), ("B", b_idx))}
    mean = compute_mean_image(splits.train).to(device)  # one mean image (A and B): copied layers see the same input

    def fresh(side: str, key: str) -> nn.Module:
        seed_everything(_cell_seed(cfg, key))
        return build_model(cfg.model, len(tasks[side].classes), splits.channels,
                           options=cfg.model_options).to(device)

    layers = len(weighted_layers(fresh("B", "baseB")))
    keys = ["baseA", "baseB"] + [f"{kind}/{n}" for n in range(1, layers) for kind in KINDS]
    log.info("transfer study in %s: A = {%s}, B = {%s}, %d weighted layers, %d cells (%d finished)",
             out, ", ".join(tasks["A"].classes), ", ".join(tasks["B"].classes), layers, len(keys),
             sum(store.done(k) for k in keys))
    bases: dict[str, nn.Module] = {}
    trained = 0
    bar = cell_bar(len(keys), sum(store.done(k) for k in keys), "transfer", progress)
    try:
        for key in keys:
            if key.startswith("base"):
                side = key[-1]
                path = out / f"{key}.safetensors"
                if store.done(key) and path.exists():
                    bases[side] = _load_base(path, fresh(side, key))
                    continue
                model = fresh(side, key)
                task = tasks[side]
                result = train_network(model, task.train, task.val, cfg, seed=_cell_seed(cfg, key), mean=mean,
                                       device=device)
                _save_base(path, model, cfg, task, mean, splits, result)
                bases[side] = model
            else:
                if store.done(key):
                    continue
                kind, n = key.split("/")
                model = fresh("B", key)
                transplant(model, bases[kind[0]], int(n), freeze=not kind.endswith("+"))
                result = train_network(model, tasks["B"].train, tasks["B"].val, cfg, seed=_cell_seed(cfg, key),
                                       mean=mean, device=device)
            store.record(key, result)
            trained += 1
            bar.update()
            log.info("%-7s held-out top-1 on %s %.4f  (%.1fs)", key, "A" if key == "baseA" else "B", result["acc1"],
                     result["seconds"])
    finally:
        bar.close()
    md, csv_path, png = write_transfer_report(out, store.cells, layers, tasks["A"].classes, tasks["B"].classes)
    return {"cells": store.cells, "layers": layers, "trained": trained, "A": tasks["A"].classes,
            "B": tasks["B"].classes, "out": str(out), "table_md": str(md), "table_csv": str(csv_path),
            "plot": str(png)}


def _save_base(path: Path, model: nn.Module, cfg: TransferConfig, task: _Task, mean, splits: Splits,
               result: dict) -> None:
    save_checkpoint(path, Checkpoint(
        model_name=cfg.model, model_options=dict(model.model_options), model_state=model.state_dict(),
        classes=task.classes, mean_image=mean, epoch=cfg.epochs,
        meta={"config": {"data": cfg.data, "val_fraction": cfg.val_fraction, "seed": cfg.seed},
              "channels": splits.channels, "input_size": list(model_info(cfg.model).input_size[1:]),
              "val": result, "study": "transfer"}))


def _load_base(path: Path, model: nn.Module) -> nn.Module:
    load_weights(model, load_checkpoint(path, map_location=next(model.parameters()).device).model_state,
                 source=str(path))
    return model


def write_transfer_report(out: Path, cells: dict, layers: int, a: list[str], b: list[str]):
    """transfer.md / transfer.csv (one row per n) and the Yosinski-style plot transfer.png."""
    from cnnkit.train.plots import plt, save_figure

    def acc(key):
        return cells.get(key, {}).get("acc1")

    header = ["n", *KINDS]
    rows = [["0 (baseB)", *([acc("baseB")] * len(KINDS))]]
    rows += [[n, *(acc(f"{k}/{n}") for k in KINDS)] for n in range(1, layers)]
    base_a = "-" if acc("baseA") is None else f"{acc('baseA'):.4f}"
    title = f"Held-out top-1 accuracy on B = {{{', '.join(b)}}} (A = {{{', '.join(a)}}}); baseA on A: {base_a}"
    md, csv_path = write_tables(out, "transfer", header, rows, title=title)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"BnB": ("o-", "tab:blue"), "BnB+": ("o--", "tab:cyan"), "AnB": ("D-", "tab:red"),
              "AnB+": ("D--", "tab:pink")}
    ns = list(range(1, layers))
    for kind, (style, colour) in styles.items():
        ys = [acc(f"{kind}/{n}") for n in ns]
        ax.plot(ns, [float("nan") if y is None else y for y in ys], style, color=colour, label=kind)
    if acc("baseB") is not None:
        ax.plot([0], [acc("baseB")], "ws", markeredgecolor="black", markersize=8, label="baseB")
        ax.axhline(acc("baseB"), color="gray", lw=0.8, ls=":")
    ax.set(xlabel="layer n at which the network is chopped and retrained", ylabel="top-1 accuracy on B",
           xticks=range(0, layers), title="transferability of features (Yosinski et al. 2014)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    png = out / "transfer.png"
    save_figure(fig, png)
    return md, csv_path, png
