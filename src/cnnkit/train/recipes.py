"""Training recipes as published: ``cnnkit train --recipe NAME``.

Each recipe is a table of settings (TrainConfig fields) with the place in the paper each value comes
from. A value the paper does not state is marked so, with where cnnkit's value comes from instead.
Any value can be overridden by a config file or a flag (defaults < recipe < --config < flags).
``docs/recipes.md`` is this table rendered (:func:`markdown_table`; a test keeps the two in step).

What no recipe reproduces: the papers' weight initialisations (the zoo models' own are used; only
``lenet5_1998``'s is its paper's),
multi-GPU model parallelism (AlexNet), DistBelief's asynchronous SGD and Andrew Howard's photometric
distortions (GoogLeNet), and LeNet's stochastic diagonal Levenberg-Marquardt (plain SGD is used).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cnnkit.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    name: str
    paper: str
    settings: dict[str, tuple[object, str]]  # field -> (value, source)
    notes: list[str] = field(default_factory=list)

    def values(self) -> dict:
        return {k: v for k, (v, _) in self.settings.items()}


NOT_STATED = "not stated in the paper"

RECIPES: dict[str, Recipe] = {}


def _add(recipe: Recipe) -> None:
    RECIPES[recipe.name] = recipe


_add(Recipe(
    "alexnet2012",
    "A. Krizhevsky, I. Sutskever, G. E. Hinton. ImageNet classification with deep convolutional neural "
    "networks. NIPS 2012",
    {
        "model": ("alexnet", "Sec. 3.5, Fig. 2"),
        "batch_size": (128, "Sec. 5"),
        "momentum": (0.9, "Sec. 5"),
        "weight_decay": (5e-4, "Sec. 5"),
        "lr": (0.01, "Sec. 5"),
        "schedule": ("plateau", "Sec. 5: divided by 10 when the validation error rate stopped improving"),
        "plateau_metric": ("error", "Sec. 5"),
        "gamma": (0.1, "Sec. 5"),
        "patience": (2, f"{NOT_STATED}; cnnkit's default"),
        "epochs": (90, "Sec. 5: roughly 90 cycles through the training set"),
        "dropout": (0.5, "Sec. 4.2: the first two fully connected layers"),
        "load_size": ((256, 256), "Sec. 2: images down-sampled to 256 x 256"),
        "augment": ("crop,flip,pca=0.1", "Sec. 4.1: random 224 crops, reflections, PCA colour noise sigma 0.1"),
        "mean": ("image", "Sec. 2: the mean activity over the training set subtracted from each pixel"),
        "tta": ("10crop", "Sec. 4.1: four corners and centre, and their reflections, softmax averaged"),
    },
    ["The paper says 224 x 224 inputs; the zoo's alexnet takes 227 x 227 (the size that makes the "
     "strides add up), so crops are 227 from 256.",
     "The paper reduces the learning rate three times before stopping; --schedule plateau decides when."],
))

_add(Recipe(
    "vgg2014",
    "K. Simonyan, A. Zisserman. Very deep convolutional networks for large-scale image recognition. "
    "ICLR 2015 (arXiv:1409.1556)",
    {
        "model": ("vgg_d", "Table 1, configuration D (16 weight layers)"),
        "batch_size": (256, "Sec. 3.1"),
        "momentum": (0.9, "Sec. 3.1"),
        "weight_decay": (5e-4, "Sec. 3.1"),
        "dropout": (0.5, "Sec. 3.1: the first two fully connected layers"),
        "lr": (0.01, "Sec. 3.1"),
        "schedule": ("plateau", "Sec. 3.1: decreased by 10 when the validation accuracy stopped improving"),
        "plateau_metric": ("error", "Sec. 3.1"),
        "gamma": (0.1, "Sec. 3.1"),
        "patience": (2, f"{NOT_STATED}; cnnkit's default"),
        "epochs": (74, "Sec. 3.1: 370K iterations (74 epochs)"),
        "load_size": ((256, 256), "images are loaded at Smin, so that jittering only enlarges them"),
        "augment": ("scale=256:512,flip,pca=0.1",
                    "Sec. 3.1: S in [256, 512], 224 crops, horizontal flips, random RGB colour shift"),
        "mean": ("channel", "Sec. 2.1: the mean RGB value subtracted from each pixel"),
        "tta": ("multiscale", "Sec. 3.2: dense evaluation of the fully convolutional net, flips averaged"),
        "tta_scales": ([256, 384, 512], "Sec. 4.2: Q = {Smin, (Smin + Smax) / 2, Smax} for jittered S"),
    },
    ["VGG initialised the deeper nets from configuration A (Sec. 3.1); cnnkit uses the zoo's initialisation."],
))

_add(Recipe(
    "googlenet2014",
    "C. Szegedy et al. Going deeper with convolutions. CVPR 2015 (arXiv:1409.4842)",
    {
        "model": ("googlenet", "Sec. 5, Table 1"),
        "model_options": ({"aux_logits": True}, "Sec. 5: auxiliary classifiers on 4a and 4d"),
        "aux_weight": (0.3, "Sec. 5: auxiliary losses weighted by 0.3"),
        "momentum": (0.9, "Sec. 6"),
        "schedule": ("step", "Sec. 6: learning rate decreased by 4% every 8 epochs"),
        "step_size": (8, "Sec. 6"),
        "gamma": (0.96, "Sec. 6"),
        "weight_average": ("polyak", "Sec. 6: Polyak averaging for the final model"),
        "lr": (0.01, f"{NOT_STATED}; BVLC Caffe replication (models/bvlc_googlenet/solver.prototxt)"),
        "batch_size": (32, f"{NOT_STATED}; BVLC replication (train_val.prototxt)"),
        "weight_decay": (2e-4, f"{NOT_STATED}; BVLC replication (solver.prototxt)"),
        "epochs": (250, f"{NOT_STATED}; BVLC replication: 10M iterations of 32 images"),
        "load_size": ((256, 256), "cnnkit's choice: windows are cut from the image as loaded"),
        "augment": ("aspect=0.08:1:0.75:1.3333,flip",
                    "Sec. 6: patches of 8%..100% of the area, aspect ratio in [3/4, 4/3]; flips as BVLC"),
        "mean": ("channel", f"{NOT_STATED}; BVLC replication subtracts per-channel means (104, 117, 123)"),
        "tta": ("10crop", "Sec. 7 uses 144 crops per image; cnnkit's closest protocol"),
    },
    ["Dropout 40% before the classifier and 70% in the auxiliary heads are part of the zoo model (Sec. 5).",
     "Andrew Howard's photometric distortions (Sec. 6) are not reproduced."],
))

_add(Recipe(
    "chatfield2014",
    "K. Chatfield, K. Simonyan, A. Vedaldi, A. Zisserman. Return of the devil in the details: delving deep "
    "into convolutional nets. BMVC 2014 (arXiv:1405.3531)",
    {
        "model": ("cnn_m", "Table 1 (cnn_f and cnn_s train the same way)"),
        "momentum": (0.9, "Sec. 3.2, CNN training"),
        "weight_decay": (5e-4, "Sec. 3.2"),
        "lr": (0.01, "Sec. 3.2"),
        "schedule": ("plateau", "Sec. 3.2: decreased by 10 when the validation error stops decreasing"),
        "plateau_metric": ("error", "Sec. 3.2"),
        "gamma": (0.1, "Sec. 3.2"),
        "patience": (2, f"{NOT_STATED}; cnnkit's default"),
        "dropout": (0.5, "Table 1: dropout in full6 and full7"),
        "batch_size": (128, f"{NOT_STATED}; Krizhevsky et al.'s, whose protocol the paper follows"),
        "epochs": (90, f"{NOT_STATED}; Krizhevsky et al.'s"),
        "load_size": ((256, 256), "Sec. 2.4: the smallest side downsized to 256"),
        "augment": ("crop,flip,pca=0.1", "Sec. 3.2: random crops, horizontal flips and RGB colour jittering"),
        "mean": ("image", "the authors' released models subtract a mean image of the crop size"),
        "tta": ("10crop", "Sec. 2.4: crops from the four corners and the centre, and their flips"),
    },
    ["For the paper's VOC fine-tuning use --loss ranking-hinge (Sec. 3.2) and --l2-features.",
     "The gray-scale experiment (~3% worse) is --augment gray."],
))

_add(Recipe(
    "lenet1998",
    "Y. LeCun, L. Bottou, Y. Bengio, P. Haffner. Gradient-based learning applied to document recognition. "
    "Proc. IEEE 86(11), 1998",
    {
        "model": ("lenet5", "Sec. II-B, Fig. 2, simplified as lenet.py states (lenet5_1998 is the paper's)"),
        "batch_size": (1, "Appendix B: stochastic (on-line) updates, one pattern at a time"),
        "epochs": (20, "Sec. III-B: 20 passes through the training set"),
        "schedule": ("piecewise", "Sec. III-B: the global learning rate schedule"),
        "lr_steps": ([[1, 1.0], [3, 0.4], [6, 0.2], [9, 0.1], [13, 0.02]],
                     "Sec. III-B: 0.0005 for 2 passes, 0.0002 for 3, 0.0001 for 3, 0.00005 for 4, then 0.00001"),
        "lr": (0.01, "deviation: the paper's 0.0005 is the global rate of stochastic diagonal "
                     "Levenberg-Marquardt (Appendix C); this is plain SGD's"),
        "momentum": (0.0, "Appendix C: the update rule has no momentum term"),
        "weight_decay": (0.0, "no weight decay in the paper"),
        "mean": ("image", "deviation: the paper maps background to -0.1 and ink to 1.175 (Sec. II-B)"),
        "augment": ("", "the undistorted training set (Sec. III-B reports distortions separately)"),
        "tta": ("center", "one view per image"),
    },
    ["lr_steps multiply --lr from the given epoch on: the paper's schedule relative to its first value.",
     "--model lenet5_1998 is the paper's own net (Table I C3, RBF output, its initialisation); with one "
     "pattern per step it needs a lower --lr than lenet5 (--lr 0.01 stayed at chance on digits)."],
))


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None


def _fmt(value) -> str:
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}x{value[1]}"
    if isinstance(value, str):
        return f"`{value}`" if value else "(none)"
    if isinstance(value, float):
        return f"{value:g}"
    return f"`{value}`" if isinstance(value, (dict, list)) else str(value)


def markdown_table(recipe: Recipe) -> str:
    """The recipe as a Markdown table: setting, value, source."""
    rows = [f"### `{recipe.name}`", "", recipe.paper, "", "| setting | value | source |", "|---|---|---|"]
    rows += [f"| {k} | {_fmt(v)} | {src} |" for k, (v, src) in recipe.settings.items()]
    rows += [""] + [f"- {note}" for note in recipe.notes]
    return "\n".join(rows) + "\n"
