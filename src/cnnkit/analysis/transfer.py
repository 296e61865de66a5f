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
activations have no weights and come along for free. Frozen layers are excluded from the optimiser and
their normalisation layers run in eval mode, so their weights and statistics stay bit for bit.

Every network is one run of the training runner (:func:`cnnkit.train.runner.fit`, SGD with momentum and
a cosine schedule) with a :class:`TransferTask`, in its own run folder ``out/runs/KEY`` (baseA, baseB,
BnB_1, BnB+_1, AnB_1, AnB+_1, ...); the base networks are ``runs/baseA/last.safetensors`` and
``runs/baseB/last.safetensors``. ``out`` also gets ``results.json`` (one entry per finished network,
see ``study.ResultStore``), ``transfer.md``/``transfer.csv`` and ``transfer.png``. A rerun skips the
finished networks and continues an interrupted one from its last epoch.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnkit.analysis.study import ResultStore, cell_bar, write_tables
from cnnkit.data import Splits, compute_mean_image, load_dataset, parse_augment
from cnnkit.errors import ConfigError
from cnnkit.models import model_info
from cnnkit.train.checkpoint import load_checkpoint, load_weights
from cnnkit.train.classification import ClassificationTask, build_model, model_channels
from cnnkit.train.config import TrainConfig
from cnnkit.train.losses import make_loss
from cnnkit.train.runner import fit

log = logging.getLogger(__name__)

KINDS = ("BnB", "BnB+", "AnB", "AnB+")
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
RUN_ONLY = ("out", "device", "workers", "compile", "channels_last")  # how a network runs, not what it learns


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


# --------------------------------------------------------------------------- one network: a runner task


class TransferTask(ClassificationTask):
    """One network of the study as a runner task: the classes ``keep`` of ``data`` (relabelled 0..k-1)
    and, for a cell, the first ``n`` layers of the base network in checkpoint ``base``, frozen if ``freeze``.

    ``init_seed`` seeds the fresh weights (``TrainConfig.seed`` stays the data's seed: the held-out split,
    the batch order). ``mean`` is subtracted from every network's input: the mean image of the whole
    training set, A and B, so that a copied layer sees its input centred as in its base network.
    """

    name = "transfer"

    def __init__(self, data: Splits, keep: list[int], mean: torch.Tensor, *, init_seed: int,
                 base: Path | None = None, n: int = 0, freeze: bool = False):
        self.data, self.keep, self.shared_mean, self.init_seed = data, keep, mean, init_seed
        self.base, self.n, self.freeze = base, n, freeze

    def prepare(self, cfg, ctx) -> None:
        self.size = self.load = tuple(model_info(cfg.model).input_size[1:])
        train, val = class_subset(self.data.train, self.keep), class_subset(self.data.val, self.keep)
        self.classes, self.channels = train.classes, self.data.channels
        self.description = (f"{self.data.description}; classes {', '.join(self.classes)}: "
                            f"{len(train)} train / {len(val)} val")
        self.splits = Splits(train, val, self.classes, self.channels, self.description)
        self.augment, self.view, self.loss_fn = parse_augment("", self.size), None, make_loss(cfg.loss)

    def build_model(self, cfg) -> nn.Module:
        torch.manual_seed(self.init_seed)
        model = super().build_model(cfg)
        if self.base is not None:
            # Building the base draws weights of its own (its head's size is A's or B's): fork, so that the
            # four networks at layer n go on to draw the same random numbers (e.g. dropout masks).
            with torch.random.fork_rng(devices=[]):
                source = load_checkpoint(self.base).build_model()
            transplant(model, source, self.n, freeze=self.freeze)
        return model

    def init_state(self, cfg) -> None:
        self.mean = self.shared_mean

    def checkpoint_fields(self) -> dict:
        fields = super().checkpoint_fields()
        fields["meta"].update(study="transfer", init_seed=self.init_seed, copied_layers=self.n, frozen=self.freeze,
                              base=str(self.base) if self.base is not None else None)
        return fields


# --------------------------------------------------------------------------- the study


def _cell_seed(cfg: TransferConfig, key: str) -> int:
    """The seed of a network's fresh weights. baseA and baseB get their own; the four networks at layer n
    share one (a paired design): the same fresh weights above layer n and, like every network on B, the
    same batch order, so that their differences come from the copied layers and from freezing alone."""
    if key.startswith("base"):
        return cfg.seed * 1000 + (0 if key == "baseA" else 1)
    return cfg.seed * 1000 + 1 + int(key.split("/")[1])


def network_config(cfg: TransferConfig, key: str) -> TrainConfig:
    """The runner's configuration of network ``key`` ("baseA", "AnB+/3", ...): SGD with momentum, cosine schedule."""
    return TrainConfig(data=cfg.data, model=cfg.model, model_options=dict(cfg.model_options),
                       out=str(Path(cfg.out) / "runs" / key.replace("/", "_")), epochs=cfg.epochs,
                       batch_size=cfg.batch_size, lr=cfg.lr, optimizer="sgd", momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, schedule="cosine", val_fraction=cfg.val_fraction, seed=cfg.seed,
                       device=cfg.device)


def _check_same_network(last: Path, cfg: TrainConfig, classes: list[str]) -> None:
    """An interrupted network is continued only if it is this one (a study's results.json appears only
    after its first network, so the study's own settings check cannot catch this yet)."""
    saved = load_checkpoint(last)
    theirs = {**saved.meta.get("config", {}), "classes": saved.classes}
    ours = {**json.loads(json.dumps(asdict(cfg))), "classes": classes}
    diff = [k for k in ours if k not in RUN_ONLY and theirs.get(k) != ours[k]]
    if diff:
        k = diff[0]
        raise ConfigError(f"{last.parent} holds a network trained with other settings ({k}: {theirs.get(k)!r} there, "
                          f"{ours[k]!r} now); use the same settings, delete that folder or choose another --out")


def _train(key: str, cfg: TransferConfig, task: TransferTask) -> dict:
    """Train (or continue) one network through the runner; its held-out metrics after the last epoch."""
    train_cfg = network_config(cfg, key)
    last = Path(train_cfg.out) / "last.safetensors"
    if last.exists():
        _check_same_network(last, train_cfg, [task.data.classes[i] for i in task.keep])
        log.info("%s: continuing the interrupted network in %s", key, last.parent)
    summary = fit(train_cfg, resume=last.exists(), progress=False, task=task)
    with open(Path(train_cfg.out) / "metrics.csv", newline="") as f:  # every epoch, interrupted runs included
        seconds = sum(float(row["seconds"]) for row in csv.DictReader(f))
    return {"acc1": summary["final"]["val_acc1"], "loss": summary["final"]["val_loss"], "seconds": round(seconds, 3)}


def run_transfer(cfg: TransferConfig, *, progress: bool | None = None) -> dict:
    """Run (or continue) the study; returns {"cells", "layers", "A", "B", paths}."""
    splits: Splits = load_dataset(cfg.data, model_info(cfg.model).input_size[1:], channels=model_channels(cfg.model),
                                  val_fraction=cfg.val_fraction, seed=cfg.seed)
    a_idx, b_idx = split_classes(splits.classes, cfg.split_a, cfg.split_b, cfg.split_seed)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "device")}
    settings.update(split_a=[splits.classes[i] for i in a_idx], split_b=[splits.classes[i] for i in b_idx])
    store = ResultStore(cfg.out, "transfer", settings)
    out = store.out
    sides = {"A": a_idx, "B": b_idx}
    classes = {side: [splits.classes[i] for i in idx] for side, idx in sides.items()}
    mean = compute_mean_image(splits.train)  # one mean image (A and B): copied layers see the same input
    layers = len(weighted_layers(build_model(cfg.model, len(b_idx), splits.channels, options=cfg.model_options)))
    keys = ["baseA", "baseB"] + [f"{kind}/{n}" for n in range(1, layers) for kind in KINDS]
    base_path = {side: Path(network_config(cfg, f"base{side}").out) / "last.safetensors" for side in sides}
    log.info("transfer study in %s: A = {%s}, B = {%s}, %d weighted layers, %d cells (%d finished)",
             out, ", ".join(classes["A"]), ", ".join(classes["B"]), layers, len(keys),
             sum(store.done(k) for k in keys))
    trained = 0
    bar = cell_bar(len(keys), sum(store.done(k) for k in keys), "transfer", progress)
    try:
        for key in keys:
            if key.startswith("base"):
                side = key[-1]
                if store.done(key) and base_path[side].exists():
                    continue
                task = TransferTask(splits, sides[side], mean, init_seed=_cell_seed(cfg, key))
            else:
                if store.done(key):
                    continue
                kind, n = key.split("/")
                task = TransferTask(splits, b_idx, mean, init_seed=_cell_seed(cfg, key), base=base_path[kind[0]],
                                    n=int(n), freeze=not kind.endswith("+"))
            result = _train(key, cfg, task)
            store.record(key, result)
            trained += 1
            bar.update()
            log.info("%-7s held-out top-1 on %s %.4f  (%.1fs)", key, "A" if key == "baseA" else "B", result["acc1"],
                     result["seconds"])
    finally:
        bar.close()
    md, csv_path, png = write_transfer_report(out, store.cells, layers, classes["A"], classes["B"])
    return {"cells": store.cells, "layers": layers, "trained": trained, "A": classes["A"], "B": classes["B"],
            "out": str(out), "runs": str(out / "runs"), "table_md": str(md), "table_csv": str(csv_path),
            "plot": str(png)}


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
