"""``cnnkit train``, ``cnnkit eval`` and ``cnnkit predict``: parse arguments, call the library, print."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cnnkit.errors import ConfigError

DATA_HELP = ("'digits' (scikit-learn's bundled handwritten digits, the default), a folder of MNIST IDX files "
             "(raw or .gz), a folder of CIFAR-10 python batches, or a class-folder tree "
             "(ROOT/CLASS/IMAGE, optionally ROOT/train and ROOT/val)")


def parse_size(text: str) -> tuple[int, int]:
    """'32' or '32x48' (H x W)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 32 or 32x48, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size must look like 32 or 32x48, got {text!r}")
    return tuple(parts)


def add_train_arguments(p: argparse.ArgumentParser, defaults) -> None:
    """Training options shared by `train` and `demo` (defaults from a TrainConfig)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help=f"dataset: {DATA_HELP} (default: {defaults.data})")
    g.add_argument("--val-fraction", type=float, default=None,
                   help=f"held-out fraction when the data has no split of its own (default {defaults.val_fraction})")
    g.add_argument("--input-size", type=parse_size, default=None, metavar="HxW",
                   help="resize images to this size (default: the model's native input)")
    g.add_argument("--skip-bad-files", action="store_true", default=None,
                   help="skip corrupt or unreadable images (listed in the log) instead of stopping")
    g.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default 0)")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", default=None, help=f"model name, see `cnnkit models` (default {defaults.model})")
    g.add_argument("--epochs", type=int, default=None, help=f"number of epochs (default {defaults.epochs})")
    g.add_argument("--batch-size", type=int, default=None, help=f"(default {defaults.batch_size})")
    g.add_argument("--lr", type=float, default=None, help=f"SGD learning rate (default {defaults.lr})")
    g.add_argument("--momentum", type=float, default=None, help=f"(default {defaults.momentum})")
    g.add_argument("--weight-decay", type=float, default=None, help=f"L2 penalty (default {defaults.weight_decay})")
    g.add_argument("--schedule", choices=["step", "plateau", "none"], default=None,
                   help="learning-rate schedule: 'step' multiplies by --gamma every --step-size epochs; "
                   "'plateau' when the held-out loss stops improving for --patience epochs "
                   f"(default {defaults.schedule})")
    g.add_argument("--step-size", type=int, default=None, help=f"(default {defaults.step_size})")
    g.add_argument("--gamma", type=float, default=None, help=f"(default {defaults.gamma})")
    g.add_argument("--patience", type=int, default=None, help=f"(default {defaults.patience})")
    g.add_argument("--dropout", type=float, default=None,
                   help="dropout probability in the fully connected layers, for models that take it")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help=f"run folder for metrics, plots, checkpoints (default {defaults.out})")
    g.add_argument("--seed", type=int, default=None, help="random seed; a CPU run repeats bit for bit (default 0)")
    g.add_argument("--device", default=None, help="auto (CUDA when present), cpu, cuda or cuda:N (default auto)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (its saved settings are kept; "
                   "--epochs may be raised)")


def config_from_args(args: argparse.Namespace, base):
    """A TrainConfig from ``base`` with every option the user gave on the command line."""
    from cnnkit.train.runner import TrainConfig

    overrides = {k: v for k, v in vars(args).items() if v is not None and k in TrainConfig.__dataclass_fields__}
    return TrainConfig.from_dict({**base.__dict__, **overrides})


def run_train(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from cnnkit.train.runner import TrainConfig, fit

    cfg = config_from_args(args, TrainConfig())
    with logging_redirect_tqdm():
        summary = fit(cfg, resume=args.resume)
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    final, best = summary["final"], summary["best"]
    print(f"held-out top-1 accuracy {final['val_acc1']:.4f} (top-5 {final['val_acc5']:.4f}) after epoch "
          f"{final['epoch']}; best {best['val_acc1']:.4f} at epoch {best['epoch']}")
    print(f"run folder: {summary['out']} (metrics.csv, curves.png, confusion.png, best/last.safetensors)")


def run_eval(args: argparse.Namespace) -> int:
    from cnnkit.train.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, device=args.device,
                                 batch_size=args.batch_size, out=args.out, skip_bad_files=args.skip_bad_files)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['checkpoint']} on {result['data']} [{result['split']}, {result['images']} images]: "
              f"top-1 accuracy {result['acc1']:.4f}, top-5 {result['acc5']:.4f}, "
              f"top-1 error {1 - result['acc1']:.4f}, loss {result['loss']:.4f}")
        if result.get("confusion_png"):
            print(f"confusion matrix: {result['confusion_png']}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from cnnkit.train.evaluation import predict_files

    if args.topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {args.topk}")
    rows = predict_files(args.checkpoint, args.images, topk=args.topk, device=args.device)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        guesses = ", ".join(f"{c} {p:.3f}" for c, p in zip(row["classes"], row["probabilities"]))
        print(f"{row['file']}\t{guesses}")
    return 0


def register(sub) -> None:
    from cnnkit.train.runner import TrainConfig

    p = sub.add_parser(
        "train", help="train a model and write a run folder",
        description="Train a zoo model (LeNet-5 by default) with SGD + momentum on a dataset. The run folder "
        "gets metrics.csv, curves.png, confusion.png, args.json and best/last checkpoints (safetensors). "
        "The training set's mean image is subtracted from every input and stored with the model.",
    )
    add_train_arguments(p, TrainConfig())
    p.set_defaults(func=run_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on held-out data",
                       description="Top-1/top-5 accuracy and loss of a checkpoint. By default on the held-out "
                       "split of the data it was trained on (re-created from its seed).")
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint from a run folder")
    p.add_argument("--data", help=f"evaluate on another dataset with the same classes: {DATA_HELP}")
    p.add_argument("--split", choices=["val", "train", "all"], default="val", help="which split (default val)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-bad-files", action="store_true", help="skip corrupt images instead of stopping")
    p.add_argument("--out", type=Path, help="folder for confusion.png and eval.json")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("predict", help="classify image files with a checkpoint",
                       description="Print the top-k classes and their probabilities for each image file "
                       "(any format Pillow reads).")
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint from a run folder")
    p.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    p.add_argument("--topk", type=int, default=3, help="how many classes to print per image (default 3)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_predict)

