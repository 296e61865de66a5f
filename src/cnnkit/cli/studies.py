"""The lecture's studies as commands: ``transfer``, ``features``, ``retrieve``, ``visualize``, ``ablate``.

Each parses its arguments, calls ``cnnkit.analysis`` and prints a short report; ``transfer`` and
``ablate`` are resumable (run the same command again after an interruption).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path

from cnnkit.cli.argtypes import count, fraction, interval, nonnegative_float, positive_float, positive_int, seed
from cnnkit.cli.train import DATA_HELP
from cnnkit.errors import ConfigError
from cnnkit.utils import output_folder

INTERRUPTED = "interrupted: finished cells are kept in {out}/results.json; run the same command again to continue\n"


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _unit(text: str) -> tuple[int, int, int]:
    values = _ints(text)
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"--unit must be C,Y,X (three integers), got {text!r}")
    return tuple(values)


def _options(items: list[str] | None, model: str) -> dict:
    """--option KEY=VALUE pairs for the model's builder, typed like its defaults."""
    from cnnkit.analysis.ablate import model_options, parse_value

    known = model_options(model)
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise ConfigError(f"--option {item!r} must be KEY=VALUE with KEY one of {', '.join(sorted(known))} "
                              f"(options of {model})")
        options[key] = parse_value(value, known[key], key)
    return options


def _quiet_runner(verbose: bool) -> None:
    if not verbose:  # one line per finished cell, not one per epoch of every network
        logging.getLogger("cnnkit.train.runner").setLevel(logging.WARNING)


def _print_table(path: str) -> None:
    print(Path(path).read_text().rstrip())


# --------------------------------------------------------------------------- transfer


def run_transfer_cmd(args: argparse.Namespace) -> int:
    from cnnkit.analysis.transfer import TransferConfig, run_transfer

    cfg = TransferConfig(data=args.data, model=args.model, model_options=_options(args.option, args.model),
                         split_a=_list(args.split_a) if args.split_a is not None else None,
                         split_b=_list(args.split_b) if args.split_b is not None else None,
                         split_seed=args.split_seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         momentum=args.momentum, weight_decay=args.weight_decay, val_fraction=args.val_fraction,
                         seed=args.seed, out=args.out, device=args.device)
    if cfg.epochs < 1 or cfg.lr <= 0 or cfg.batch_size < 1:
        raise ConfigError("--epochs and --batch-size must be at least 1 and --lr positive")
    _quiet_runner(False)
    t0 = time.perf_counter()
    try:
        with output_folder(cfg.out, keep_complete=True):  # a failure leaves no new empty folder
            result = run_transfer(cfg)
    except KeyboardInterrupt:
        print(INTERRUPTED.format(out=cfg.out), end="", flush=True)
        return 130
    _print_table(result["table_md"])
    print(f"\n{result['layers']} weighted layers, n = 1..{result['layers'] - 1}; {len(result['cells'])} cells, "
          f"{result['trained']} trained in this run ({time.perf_counter() - t0:.1f} s)")
    print(f"wrote {result['table_md']}, {result['table_csv']}, {result['plot']}; one run folder per network "
          f"in {result['runs']} (the base networks: baseA/last.safetensors, baseB/last.safetensors)")
    return 0


def _add_transfer(sub) -> None:
    p = sub.add_parser(
        "transfer", help="how transferable are features? (Yosinski et al. 2014: AnB, BnB, AnB+, BnB+)",
        description="Split the classes into A and B, train baseA and baseB, then for every layer n build BnB and "
        "AnB (first n layers copied from baseB/baseA and frozen, the rest re-initialised and trained on B) and "
        "BnB+, AnB+ (all layers trained), and evaluate each on B's held-out images. Writes transfer.md/.csv, "
        "transfer.png and results.json, and each network as a training run folder under OUT/runs; interrupted runs "
        "continue where they stopped (an interrupted network from its last epoch) when run again.")
    p.add_argument("--data", default="digits", help=f"dataset: {DATA_HELP} (default digits)")
    p.add_argument("--model", default="small_cnn", help="zoo model (default small_cnn)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="model option, repeatable, e.g. --option fc_width=64/64 --option channels=8")
    p.add_argument("--split-a", metavar="CLASSES", help="classes of A, names or indices: 0,1,2,3,4 "
                   "(default: a random half, drawn with --split-seed)")
    p.add_argument("--split-b", metavar="CLASSES", help="classes of B (default: the classes not in A)")
    p.add_argument("--split-seed", type=seed, default=0, help="seed of the random A/B split (default 0)")
    p.add_argument("--epochs", type=positive_int, default=6, help="epochs per network (default 6)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, default=0.05, help="SGD learning rate, cosine-annealed (default 0.05)")
    p.add_argument("--momentum", type=fraction, default=0.9)
    p.add_argument("--weight-decay", type=nonnegative_float, default=5e-4)
    p.add_argument("--val-fraction", type=interval("(0, 1)"), default=0.2)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", default="runs/transfer", help="study folder (default runs/transfer)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_transfer_cmd)


# --------------------------------------------------------------------------- features and retrieval


def run_features(args: argparse.Namespace) -> int:
    from cnnkit.analysis.retrieval import export_features

    result = export_features(args.checkpoint, args.output, layer=args.layer, split=args.split, data=args.data,
                             images=args.images, l2=args.l2, device=args.device)
    n, d = result["shape"]
    print(f"{n} x {d} features of layer {result['layer']}{' (L2-normalised)' if result['l2'] else ''} -> "
          f"{', '.join(result['files'])}")
    return 0


def run_retrieve(args: argparse.Namespace) -> int:
    from cnnkit.analysis.retrieval import run_retrieval

    with output_folder(args.out, keep_complete=True) if args.out else contextlib.nullcontext():
        result = run_retrieval(args.checkpoint, layer=args.layer, metric=args.metric, ks=args.k, data=args.data,
                               images=args.images, out=args.out, normalise=args.normalise, show=args.show,
                               show_k=args.show_k, queries=args.queries, device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    subset = (f" (a random subset of {result['queries_available']}, seed {result['query_seed']})"
              if result["queries"] < result["queries_available"] else "")
    print(f"queries {result['queries']}{subset} against a database of {result['database']}, layer {result['layer']} "
          f"({result['dimensions']} dimensions), {result['metric']} distance")
    if result["rows"]:
        ks = [k for k in result["rows"][0] if k.startswith("precision@")]
        print(f"{'features':<10} {'normalised':<10} {'mAP':>7} " + " ".join(f"{k.replace('precision', 'P'):>7}"
                                                                          for k in ks))
        for row in result["rows"]:
            print(f"{row['features']:<10} {row['normalisation']:<10} {row['map']:7.4f} "
                  + " ".join(f"{row[k]:7.4f}" for k in ks))
        print(f"chance mAP {result['rows'][0]['chance_map']:.4f}")
    if "pixels_skipped" in result:
        print(f"pixel baseline skipped: {result['pixels_skipped']}")
    if "neighbours_png" in result:
        print(f"wrote {result['neighbours_png']} (queries in blue; neighbours green = same class, red = other)")
    return 0


def _add_features(sub) -> None:
    p = sub.add_parser("features", help="write a layer's features for a data split or image files",
                       description="Outputs of any named layer (flattened; by default the top hidden layer), "
                       "optionally L2-normalised, to a .npy file (with a .json of labels and settings beside it) "
                       "or a .safetensors file (features, labels and settings in one file).")
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint")
    p.add_argument("output", type=Path, help="OUT.npy or OUT.safetensors")
    p.add_argument("--layer", help="layer name, e.g. conv2 or fc3 (default: the top hidden layer)")
    p.add_argument("--split", default="val", choices=["train", "val", "all"], help="data split (default val)")
    p.add_argument("--data", help=f"another dataset with the same classes: {DATA_HELP}")
    p.add_argument("--images", nargs="+", type=Path, help="image files or folders instead of a data split")
    p.add_argument("--l2", action="store_true", help="L2-normalise every feature vector")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_features)

    p = sub.add_parser("retrieve", help="image retrieval with a layer's features: mAP, precision@k, neighbours",
                       description="Rank the training images (database) by feature distance to each held-out "
                       "image (query); report mean average precision and precision@k against the class labels, "
                       "for raw and L2-normalised features and for raw pixels (skipped, with the reason, "
                       "when that would take minutes), and draw queries with their nearest neighbours. The "
                       "ranking is exact and streams over chunks of queries, with progress bars on a terminal.")
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint")
    p.add_argument("--layer", help="layer name (default: the top hidden layer)")
    p.add_argument("--metric", default="euclidean", choices=["euclidean", "cosine"],
                   help="distance (default euclidean; cosine ranks as euclidean on L2-normalised features)")
    p.add_argument("--k", type=_ints, default=[1, 5, 10], help="precision@k for these k (default 1,5,10)")
    p.add_argument("--data", help=f"another dataset with the same classes: {DATA_HELP}")
    p.add_argument("--images", nargs="+", type=Path, help="query image files or folders (no scores: no labels)")
    p.add_argument("--normalise", default="l2", choices=["l2", "none"], help="features for the picture (default l2)")
    p.add_argument("--show", type=positive_int, default=8, help="queries in the picture (default 8)")
    p.add_argument("--show-k", type=positive_int, default=8, help="neighbours per query in the picture (default 8)")
    p.add_argument("--queries", type=positive_int, metavar="N",
                   help="use a random subset of N queries, the same in every run (default: all)")
    p.add_argument("--out", type=Path, default=Path("runs/retrieve"),
                   help="folder for neighbours.png and retrieval.json (default runs/retrieve)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_retrieve)


# --------------------------------------------------------------------------- visualize


def run_visualize(args: argparse.Namespace) -> int:
    from cnnkit.analysis.visualize import render_all

    parts = _list(args.what)
    with output_folder(args.out, keep_complete=True):  # a failure leaves no new empty folder
        results = render_all(args.checkpoint, args.out, parts=parts, layer=args.layer, image=args.image,
                             index=args.index, unit=args.unit, dense_image=args.dense_image,
                             dense_grid=args.dense_grid, dense_mean=args.dense_mean, data=args.data,
                             device=args.device)
    for part, r in results.items():
        detail = {
            "filters": lambda r: f"{r['filters']} filters {r['kernel'][0]}x{r['kernel'][1]} of {r['layer']}",
            "maps": lambda r: f"{r['maps']} maps {r['size'][0]}x{r['size'][1]} of {r['layer']}",
            "rf": lambda r: f"unit {tuple(r['unit'])} of {r['layer']}: receptive field {r['size'][0]}x{r['size'][1]} "
                            f"at rows {r['box'][0]}..{r['box'][1]}, columns {r['box'][2]}..{r['box'][3]}",
            "dense": lambda r: f"score map {r['score_map'][0]}x{r['score_map'][1]}, stride {r['stride'][0]}",
        }[part](r)
        print(f"{r['png']}: {detail}")
    return 0


def _add_visualize(sub) -> None:
    p = sub.add_parser("visualize", help="first-layer filters, feature maps, receptive fields, dense predictions",
                       description="Pictures of a trained network, as PNG files in --out: filters.png (first-layer "
                       "kernels, each contrast-normalised), maps.png (a layer's feature maps for one image), "
                       "rf.png (the receptive field of one unit drawn on the image, with the unit's input "
                       "gradient) and dense.png (the fully convolutional network's argmax on a larger image).")
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint")
    p.add_argument("--out", type=Path, default=Path("runs/visualize"), help="output folder (default runs/visualize)")
    p.add_argument("--what", default="filters,maps,rf,dense", help="which pictures (default filters,maps,rf,dense)")
    p.add_argument("--layer", help="layer for maps and rf (default: the last convolution with maps of 3x3 or more)")
    p.add_argument("--image", type=Path, help="image file for maps and rf (default: a held-out image)")
    p.add_argument("--index", type=count, default=0, help="which held-out image when no --image (default 0)")
    p.add_argument("--unit", type=_unit, help="unit C,Y,X for rf (default: the most active unit)")
    p.add_argument("--dense-image", type=Path, help="larger image for dense (default: a grid of held-out images)")
    p.add_argument("--dense-grid", type=positive_int, default=3,
                   help="held-out images per side of that grid (default 3)")
    p.add_argument("--dense-mean", choices=["channel", "tile"],
                   help="what to subtract from the larger image: each channel's mean, or the mean image tiled "
                   "(default: tile for the grid of held-out images, channel for --dense-image)")
    p.add_argument("--data", help=f"another dataset with the same classes: {DATA_HELP}")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_visualize)


# --------------------------------------------------------------------------- ablate


def run_ablate_cmd(args: argparse.Namespace) -> int:
    from cnnkit.analysis.ablate import AblateConfig, apply_settings, parse_grid, run_ablation
    from cnnkit.train.runner import TrainConfig

    base = TrainConfig(data=args.data, model=args.model, epochs=args.epochs, seed=args.seed, device=args.device,
                       schedule="step", step_size=max(1, 2 * args.epochs // 3), lr=0.05)
    base = apply_settings(base, args.set or [])
    cfg = AblateConfig(base=base, grid=parse_grid(args.grid, base.model), out=args.out)
    _quiet_runner(args.verbose)
    t0 = time.perf_counter()
    try:
        with output_folder(cfg.out, keep_complete=True):
            result = run_ablation(cfg)
    except KeyboardInterrupt:
        print(INTERRUPTED.format(out=cfg.out), end="", flush=True)
        return 130
    _print_table(result["table_md"])
    print(f"\n{len(result['cells'])} cells, {result['trained']} evaluated in this run "
          f"({time.perf_counter() - t0:.1f} s)")
    print(f"wrote {result['table_md']}, {result['table_csv']}, {result['plot']}")
    return 0


def _add_ablate(sub) -> None:
    p = sub.add_parser(
        "ablate", help="a grid of component variations (kernel, channels, stride, FC width, averaging, ...)",
        description="Train one network per grid cell (and per averaged model), evaluate on held-out data, and "
        "collect everything in ablation.md/.csv and ablation.png. Grid keys: options of the model (small_cnn: "
        "kernel_size, channels, stride, padding, fc_width), any training setting (lr, epochs, dropout, "
        "batch_size, ...), and average (number of models, differing in random initialisation, whose posteriors "
        "are averaged). Lists of integers are written with '/': channels=8/16. Interrupted runs continue where "
        "they stopped when run again.",
        epilog="example: cnnkit ablate --grid kernel_size=3,5,7 fc_width=16,64 average=1,3 --epochs 4")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2", help="the axes of the grid")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change the base run for every cell, repeatable, e.g. --set lr=0.02 --set channels=8")
    p.add_argument("--data", default="digits", help=f"dataset: {DATA_HELP} (default digits)")
    p.add_argument("--model", default="small_cnn", help="zoo model (default small_cnn)")
    p.add_argument("--epochs", type=positive_int, default=6, help="epochs per network (default 6)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", default="runs/ablate", help="study folder (default runs/ablate)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_ablate_cmd)


def register(sub) -> None:
    _add_transfer(sub)
    _add_features(sub)
    _add_visualize(sub)
    _add_ablate(sub)
