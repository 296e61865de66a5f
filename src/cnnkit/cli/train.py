"""``cnnkit train``, ``cnnkit eval`` and ``cnnkit predict``: parse arguments, call the library, print."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from cnnkit.cli.argtypes import count, fraction, interval, nonnegative_float, positive_float, positive_int, seed
from cnnkit.errors import ConfigError
from cnnkit.utils import output_folder

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


AUGMENT_HELP = ("comma-separated, applied in order on the device, e.g. 'crop,flip,pca=0.1' (AlexNet), "
                "'scale=256:512,flip' (VGG), 'aspect=0.08:1:0.75:1.333,flip' (GoogLeNet), "
                "'cast=20,vignette=0.2:0.5,lens=0.2,rotate=10' (Deep Image), 'gray'. Names: crop, center, "
                "flip[=p], scale=Smin:Smax, aspect=amin:amax:rmin:rmax, pca[=std], cast[=m], "
                "vignette[=smin:smax], lens[=kmax], rotate[=degrees], gray[=p]; see `cnnkit augment --help`")


def add_train_arguments(p: argparse.ArgumentParser, defaults, threads: int | None = None) -> None:
    """Training options shared by `train` and `demo` (defaults from a TrainConfig)."""
    from cnnkit.train.recipes import RECIPES

    g = p.add_argument_group("recipe and configuration file")
    g.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="start from a published training recipe (optimizer, schedule, batch size, augmentation, "
                   "test protocol); any value can be overridden by --config or a flag. The sources of every "
                   "value are in docs/recipes.md")
    g.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="settings file: TOML (key = value, names as the flags with '_' or '-'; a run's "
                   "config.toml works), or YAML when PyYAML is installed. Precedence: recipe < file < flags")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help=f"dataset: {DATA_HELP} (default: {defaults.data})")
    g.add_argument("--val-fraction", type=interval("(0, 1)"), default=None,
                   help=f"held-out fraction when the data has no split of its own (default {defaults.val_fraction})")
    g.add_argument("--input-size", type=parse_size, default=None, metavar="HxW",
                   help="the model's input size (default: the model's native input)")
    g.add_argument("--load-size", type=parse_size, default=None, metavar="HxW",
                   help="resize images to this size when loading (e.g. 256); --augment must then crop them to "
                   "the input size, and held-out images are judged on their central crop (default: input size)")
    g.add_argument("--augment", default=None, metavar="SPEC", help=AUGMENT_HELP)
    g.add_argument("--mean", choices=["image", "channel"], default=None,
                   help="subtract the training set's mean image (AlexNet) or its per-channel mean (VGG) "
                   f"(default {defaults.mean})")
    g.add_argument("--skip-bad-files", action="store_true", default=None,
                   help="skip corrupt or unreadable images (listed in the log) instead of stopping")
    g.add_argument("--workers", type=count, default=None,
                   help="DataLoader worker processes (default 0); memory is pinned on CUDA")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", default=None, help=f"model name, see `cnnkit models` (default {defaults.model})")
    g.add_argument("--epochs", type=positive_int, default=None, help=f"number of epochs (default {defaults.epochs})")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"global batch, split over the processes under torchrun (default {defaults.batch_size})")
    g.add_argument("--lr", type=positive_float, default=None, help=f"SGD learning rate (default {defaults.lr})")
    g.add_argument("--momentum", type=fraction, default=None, help=f"(default {defaults.momentum})")
    g.add_argument("--weight-decay", type=nonnegative_float, default=None,
                   help=f"L2 penalty (default {defaults.weight_decay})")
    g.add_argument("--schedule", choices=["step", "plateau", "piecewise", "none"], default=None,
                   help="learning-rate schedule: 'step' multiplies by --gamma every --step-size epochs; "
                   "'plateau' when the held-out loss (or error, --plateau-metric) stops improving for --patience "
                   f"epochs; 'piecewise' follows lr_steps from a recipe or config file (default {defaults.schedule})")
    g.add_argument("--step-size", type=positive_int, default=None, help=f"(default {defaults.step_size})")
    g.add_argument("--gamma", type=interval("(0, 1]"), default=None, help=f"(default {defaults.gamma})")
    g.add_argument("--patience", type=count, default=None, help=f"(default {defaults.patience})")
    g.add_argument("--plateau-metric", choices=["loss", "error"], default=None,
                   help=f"what 'plateau' watches (default {defaults.plateau_metric})")
    g.add_argument("--dropout", type=fraction, default=None,
                   help="dropout probability in the fully connected layers, for models that take it")
    g.add_argument("--loss", choices=["softmax", "ranking-hinge"], default=None,
                   help="softmax cross-entropy, or Chatfield et al.'s per-class ranking hinge loss "
                   f"(default {defaults.loss})")
    g.add_argument("--aux-weight", type=nonnegative_float, default=None,
                   help=f"weight of each auxiliary classifier's loss, GoogLeNet (default {defaults.aux_weight})")
    g.add_argument("--l2-features", action=argparse.BooleanOptionalAction, default=None,
                   help="the last layer reads L2-normalised features (Chatfield et al. 2014)")
    g.add_argument("--weight-average", choices=["none", "polyak", "ema"], default=None,
                   help="evaluate and save averaged weights: Polyak's mean of the iterates (GoogLeNet) or an "
                   f"exponential moving average (default {defaults.weight_average})")
    g.add_argument("--average-start", type=positive_int, default=None, help="first epoch that enters the average")
    g.add_argument("--ema-decay", type=interval("(0, 1)"), default=None, help=f"(default {defaults.ema_decay})")
    g.add_argument("--tta", choices=["center", "10crop", "multiscale"], default=None,
                   help="test protocol run on the best checkpoint after training (test.json); default center")
    g.add_argument("--scales", dest="tta_scales", type=positive_int, nargs="+", default=None, metavar="Q",
                   help="smaller image sides for --tta multiscale, e.g. 256 384 512")
    g = p.add_argument_group("speed (opt-in)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast the forward pass to bfloat16 or float16 (with a gradient scaler) "
                   f"(default {defaults.precision})")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (the first epoch pays the compilation)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout for convolutions")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help=f"run folder for metrics, plots, checkpoints (default {defaults.out})")
    g.add_argument("--seed", type=seed, default=None, help="random seed; a CPU run repeats bit for bit (default 0)")
    g.add_argument("--device", default=None,
                   help="auto (CUDA when present), cpu, cuda or cuda:N (default auto); under torchrun each "
                   "process takes cuda:LOCAL_RANK")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, or start it when it has none yet (its "
                   "saved settings are kept; --epochs may be raised; any number of processes)")
    g.add_argument("--threads", type=positive_int, default=threads, metavar="N",
                   help="intra-op CPU threads (default: "
                   f"{threads if threads else 'one per core'}). Small networks on a busy machine run several "
                   "times faster with 1")


def apply_threads(args: argparse.Namespace) -> None:
    """Set PyTorch's CPU thread count from --threads (a run-time choice: it changes no result)."""
    if args.threads is None:
        return
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)


def config_from_args(args: argparse.Namespace, base):
    """A config of ``base``'s class (TrainConfig or a task's subclass): ``base``, then the recipe, then the
    config file, then the flags the user gave."""
    from dataclasses import asdict

    from cnnkit.train.config import read_config_file
    from cnnkit.train.recipes import get_recipe

    cls = type(base)
    values = asdict(base)
    from_file = read_config_file(args.config, cls) if getattr(args, "config", None) else {}
    recipe = getattr(args, "recipe", None) or from_file.get("recipe")
    if recipe:
        values.update(get_recipe(recipe).values(), recipe=recipe)
    values.update(from_file)
    values.update({k: v for k, v in vars(args).items() if v is not None and k in cls.__dataclass_fields__})
    return cls.from_dict(values)


def run_train(args: argparse.Namespace) -> int:
    from cnnkit.train.runner import TrainConfig, fit

    cfg = config_from_args(args, TrainConfig())
    apply_threads(args)
    summary = fit(cfg, resume=args.resume)
    if summary["is_main"]:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    final, best = summary["final"], summary["best"]
    print(f"held-out top-1 accuracy {final['val_acc1']:.4f} (top-5 {final['val_acc5']:.4f}) after epoch "
          f"{final['epoch']}; best {best['val_acc1']:.4f} at epoch {best['epoch']}")
    if "test" in summary:
        t = summary["test"]
        print(f"test protocol {t['protocol']} on the best checkpoint: top-1 {t['acc1']:.4f} (top-5 {t['acc5']:.4f})")
    print(f"run folder: {summary['out']} (metrics.csv, curves.png, confusion.png, config.toml, "
          f"best/last.safetensors)")


def run_eval(args: argparse.Namespace) -> int:
    from cnnkit.train.evaluation import evaluate_checkpoint

    if args.tta == "multiscale" and not args.scales:
        raise ConfigError("--tta multiscale needs --scales, e.g. --scales 256 384 512")
    # a failure leaves no new --out folder (nor a confusion.png without its eval.json)
    with output_folder(args.out) if args.out else contextlib.nullcontext():
        result = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, device=args.device,
                                     batch_size=args.batch_size, out=args.out, skip_bad_files=args.skip_bad_files,
                                     tta=args.tta, scales=args.scales or (), flip=args.flip, average=args.average,
                                     load_size=args.load_size)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        models = f" averaged with {len(args.average)} more" if args.average else ""
        print(f"{result['checkpoint']}{models} on {result['data']} [{result['split']}, {result['images']} images, "
              f"{result['protocol']}]: top-1 accuracy {result['acc1']:.4f}, top-5 {result['acc5']:.4f}, "
              f"top-1 error {result['err1']:.4f}, top-5 error {result['err5']:.4f}, loss {result['loss']:.4f}")
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
        description="Train a zoo model (LeNet-5 by default) with SGD + momentum on a dataset, optionally as a "
        "paper did (--recipe). The run folder gets metrics.csv, curves.png, confusion.png, args.json, "
        "config.toml and best/last checkpoints (safetensors). The training set's mean image (or per-channel "
        "mean) is subtracted from every input and stored with the model. Several processes or machines: "
        "torchrun --nproc_per_node=N -m cnnkit train ... (see docs/training.md).",
    )
    add_train_arguments(p, TrainConfig())
    p.set_defaults(func=run_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on held-out data",
                       description="Top-1/top-5 accuracy and error, and loss, of a checkpoint. By default on the "
                       "held-out split of the data it was trained on (re-created from its seed), on the central crop "
                       "of images loaded as in training. --tta 10crop averages the softmax of the 4 corner and centre "
                       "crops and their mirrors (AlexNet); --tta multiscale runs the fully convolutional net on the "
                       "whole image rescaled to each smaller side Q in --scales and averages the posteriors over "
                       "scales and flips (VGG); --average adds checkpoints whose posteriors are averaged.")
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint from a run folder")
    p.add_argument("--tta", choices=["center", "10crop", "multiscale"], default="center",
                   help="test protocol (default center)")
    p.add_argument("--scales", type=positive_int, nargs="+", metavar="Q",
                   help="smaller sides for multiscale, e.g. 256 384 512")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="multiscale without the mirrored images")
    p.add_argument("--average", type=Path, nargs="+", default=[], metavar="CKPT",
                   help="more checkpoints (same classes) to average the class posteriors with")
    p.add_argument("--load-size", type=parse_size, metavar="HxW",
                   help="load images at this size (default: as the checkpoint's run did)")
    p.add_argument("--data", help=f"evaluate on another dataset with the same classes: {DATA_HELP}")
    p.add_argument("--split", choices=["val", "train", "all"], default="val", help="which split (default val)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per batch (default 256)")
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
    p.add_argument("--topk", type=positive_int, default=3, help="how many classes to print per image (default 3)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_predict)

