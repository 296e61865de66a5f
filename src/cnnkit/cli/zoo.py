"""``cnnkit models`` (the zoo as a table) and ``cnnkit summary MODEL`` (per-layer numbers).

For GoogLeNet the summary prints Table 1's params and ops beside the computed ones (one row per
inception module, as the paper); for AlexNet the lecture's neuron counts beside the computed ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys

import torch

from cnnkit.analysis import Reference, summary
from cnnkit.cli.argtypes import positive_int
from cnnkit.errors import ConfigError
from cnnkit.models import create, list_models, model_info
from cnnkit.models.alexnet import LECTURE_NEURONS
from cnnkit.models.googlenet import TABLE1, Inception
from cnnkit.utils import write_text_atomic

FORMATS = ("table", "csv", "json")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo (paper, input, parameters, pooling, normalisation)",
                       description="List the registered models with the facts of their papers.")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'vgg_*' (default: all)")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.set_defaults(func=run_models)

    p = sub.add_parser(
        "summary", help="per-layer output shape, neurons, parameters, MACs, receptive field, stride",
        description="Build MODEL (on the meta device: no memory, no compute) and tabulate every layer. "
        "For googlenet the paper's Table 1 columns are shown beside the computed ones, for alexnet the "
        "lecture's neuron counts; '!' marks numbers that do not add up.")
    p.add_argument("model", help="a name from `cnnkit models`")
    p.add_argument("--input", metavar="CxHxW",
                   help="input size, e.g. 3x224x224 or 256 (default: the paper's)")
    p.add_argument("--num-classes", type=positive_int, help="size of the last layer (default: the paper's)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="builder option, e.g. -o groups=1 for the ungrouped AlexNet (repeatable)")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--fully-convolutional", action="store_true",
                   help="summarise the FC->conv version (runs on larger inputs and gives a score map)")
    p.add_argument("--all-layers", action="store_true", help="also list activations and reshapes")
    p.add_argument("--out", metavar="FILE", help="write to FILE (atomically) instead of printing")
    p.set_defaults(func=run_summary)


def short_citation(paper: str) -> str:
    """'Krizhevsky, Sutskever, Hinton. ImageNet ... NIPS 2012' -> 'Krizhevsky et al. 2012'."""
    authors = [a.strip() for a in paper.split(".")[0].split(",")]
    years = re.findall(r"\b(?:19|20)\d\d\b", paper)
    who = authors[0] if len(authors) == 1 else (
        f"{authors[0]} & {authors[1]}" if len(authors) == 2 else f"{authors[0]} et al.")
    return f"{who} {years[-1]}" if years else who


def run_models(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        raise ConfigError(f"no model matches {args.pattern!r}; run `cnnkit models` to list them all")
    recs = []
    for n in names:
        info = model_info(n)
        recs.append({"name": n, "paper": short_citation(info.paper),
                     "input": "x".join(map(str, info.input_size)),
                     "params": info.reference_params, "pooling": info.pooling,
                     "normalisation": info.normalisation or "none", "notes": info.notes})
    if args.format == "json":
        sys.stdout.write(json.dumps(recs, indent=2) + "\n")
        return 0
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(recs[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(recs)
        return 0
    head = ["name", "paper", "input", "params", "pooling", "normalisation"]
    rows = [[r["name"], r["paper"], r["input"], f"{r['params']:,}" if r["params"] else "", r["pooling"],
             r["normalisation"]] for r in recs]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    for i, line in enumerate([head, ["-" * w for w in widths], *rows]):
        cells = [c.rjust(w) if j == 3 and i != 0 else c.ljust(w)
                 for j, (c, w) in enumerate(zip(line, widths))]
        sys.stdout.write("  ".join(cells).rstrip() + "\n")
    return 0


def parse_input(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    """'3x224x224' -> (3, 224, 224); '256' or '256x256' keep the model's channels."""
    if text is None:
        return tuple(default)
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or len(dims) > 3 or min(dims) < 1:
        raise ConfigError(f"--input {text!r} is not a size; write CxHxW (3x224x224), HxW or S")
    if len(dims) == 1:
        dims = dims * 2
    return dims if len(dims) == 3 else (default[0], *dims)


def parse_options(items: list[str]) -> dict:
    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {item!r} must be KEY=VALUE, e.g. groups=1")
        low = value.lower()
        if low in ("true", "false"):
            opts[key] = low == "true"
            continue
        for cast in (int, float):
            try:
                opts[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            opts[key] = value
    return opts


def paper_view(name: str) -> tuple[tuple, list[Reference]]:
    """Rows to collapse and printed columns to compare, for models whose paper tabulates numbers."""
    if name == "googlenet":
        params = Reference("params K", {k: v[0] for k, v in TABLE1.items()}, lambda r: r.weights / 1024, 0.02)
        ops = Reference("ops M", {k: v[1] for k, v in TABLE1.items()}, lambda r: r.macs / 1e6, 0.02)
        return (Inception, "features.conv2"), [params, ops]
    if name == "alexnet":
        return (), [Reference("neurons", dict(LECTURE_NEURONS), lambda r: r.neurons)]
    return (), []


def run_summary(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    opts = parse_options(args.option)
    if args.num_classes is not None:
        opts["num_classes"] = args.num_classes
    with torch.device("meta"):  # parameters without storage: instant even for VGG-E
        model = create(args.model, **opts)
    size = parse_input(args.input, getattr(model, "input_size", info.input_size))
    if args.fully_convolutional:
        model = model.to_fully_convolutional()
    collapse, refs = paper_view(args.model)
    if size != tuple(info.input_size) or opts or args.fully_convolutional:
        refs = []  # the printed numbers are for the paper's network and input only
    try:
        s = summary(model, size, collapse=collapse, references=refs)
    except ConfigError as exc:
        if args.fully_convolutional or size == tuple(info.input_size):
            raise
        raise ConfigError(f"{exc}; its FC layers need the paper's input size "
                          f"{'x'.join(map(str, info.input_size))}: add --fully-convolutional") from None
    text = {"table": lambda: s.to_table(compact=not args.all_layers), "csv": s.to_csv, "json": s.to_json}
    out = text[args.format]()
    if args.format == "table":
        out = f"{args.model}: {info.paper}\n{out}"
    if args.out:
        write_text_atomic(args.out, out)
        sys.stderr.write(f"wrote {args.out}\n")
    else:
        sys.stdout.write(out)
    return 0
