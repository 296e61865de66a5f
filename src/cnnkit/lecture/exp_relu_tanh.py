"""Section "relu_tanh": the lecture's "Choice of activation function" slide, measured.

The slide shows Krizhevsky, Sutskever and Hinton (NIPS 2012), Fig. 1: a four-layer convolutional
net with ReLUs reaches 25% training error on CIFAR-10 six times faster than the same net with tanh
("Very good (quick to train)" vs "Very bad (slow to train)"). Here one small net (``small_cnn``:
three 5 x 5 conv + ReLU + max-pool blocks and one FC layer: four weighted layers) is trained twice
on the digits, from the same initial weights, with the same SGD settings and the same batches, once
as built and once with every ReLU replaced by tanh; the training error is recorded every quarter
of a pass over the training set. Two conditions:

- "paper": the paper's scale. Its inputs are raw pixel values (0..255) minus the mean and its
  weights N(0, 0.01) with biases 1 in the hidden layers after the first; here the digits are
  multiplied by 255 in front of the net and initialised the same way.
- "unit": inputs in [0, 1] minus the mean image, Glorot-normal weights, zero biases.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

from cnnkit.errors import TrainingError
from cnnkit.lecture.exp_common import one_thread, quiet_runner, table
from cnnkit.lecture.section import Number, Section
from cnnkit.train.classification import AUGMENT_STREAM, ClassificationTask, epoch_seed, make_loader
from cnnkit.train.config import TrainConfig
from cnnkit.train.engine import train_one_epoch
from cnnkit.utils import write_json_atomic

log = logging.getLogger(__name__)

KEY = "relu_tanh"
PARTS = 4  # the runner's "epoch" here is a quarter of a pass over the training set
THRESHOLD = 0.25  # the paper's training error (Krizhevsky et al. 2012, Fig. 1)
NET = {"channels": [16, 32, 32], "kernel_size": 5, "padding": 2, "fc_width": []}


@dataclass(frozen=True)
class Condition:
    name: str
    input_scale: float  # inputs are multiplied by this in front of the net
    init: str  # "paper": N(0, 0.01), biases 1 after the first layer; "glorot": Glorot-normal, biases 0
    lr: float
    full_passes: int  # passes over the training set in the full report (--quick: QUICK_PASSES)
    what: str


QUICK_PASSES = 2
CONDITIONS = (
    Condition("paper", 255.0, "paper", 1e-3, 12, "inputs 0..255 minus the mean, weights N(0, 0.01), biases 1"),
    Condition("unit", 1.0, "glorot", 3e-2, 4, "inputs 0..1 minus the mean, Glorot-normal weights, biases 0"),
)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class ActivationTask(ClassificationTask):
    """Image classification with the net's ReLUs kept or replaced by tanh, the condition's
    initialisation and input scale, and one runner epoch being 1/``parts`` of a pass over the
    training set (a finer step for the curves).

    Part j of pass p trains on slice j of a permutation drawn from (seed, p): every part is a function
    of (seed, epoch) alone, as the runner needs, and the ReLU and tanh runs see the same batches.
    """

    name = "classify-activation"
    command = "cnnkit lecture --only relu_tanh"  # what reproduces these runs (config.toml's first line)

    def __init__(self, activation: str, condition: Condition, parts: int = PARTS):
        self.activation, self.condition, self.parts = activation, condition, parts

    def build_model(self, cfg):
        model = super().build_model(cfg)
        if self.activation == "tanh":
            for parent in list(model.modules()):
                for name, child in parent.named_children():
                    if isinstance(child, nn.ReLU):
                        setattr(parent, name, nn.Tanh())
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        g = torch.Generator().manual_seed(cfg.seed)  # the same weights for ReLU and tanh
        with torch.no_grad():
            for i, m in enumerate(layers):
                if self.condition.init == "paper":
                    m.weight.normal_(0, 0.01, generator=g)
                    m.bias.fill_(1.0 if 0 < i < len(layers) - 1 else 0.0)
                else:
                    fan_in, fan_out = m.weight[0].numel(), m.weight.shape[0] * m.weight[0, 0].numel()
                    m.weight.normal_(0, (2 / (fan_in + fan_out)) ** 0.5, generator=g)
                    m.bias.zero_()
        return model

    def train_module(self, model: nn.Module) -> nn.Module:
        return nn.Sequential(Scale(self.condition.input_scale), model)

    def train_epoch(self, net, model, optimizer, *, epoch, cfg, ctx, progress, scaler=None, averaged=None):
        n = len(self.splits.train)
        pass_, part = divmod(epoch - 1, self.parts)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(cfg, pass_, 7)))
        items = Subset(self.splits.train, order[part * n // self.parts : (part + 1) * n // self.parts].tolist())
        loader = make_loader(items, cfg, ctx, shuffle=False, epoch=epoch)
        metrics, _ = train_one_epoch(
            net, loader, optimizer, epoch=epoch, layout=loader.batch_sampler.layout, world_size=ctx.world_size,
            generator=torch.Generator().manual_seed(epoch_seed(cfg, epoch, AUGMENT_STREAM)), scaler=scaler,
            averaged=averaged, averaged_source=model, **self._run(cfg, ctx, progress))
        return metrics

    def evaluate(self, model, *, epoch, cfg, ctx, progress):
        scaled = nn.Sequential(Scale(self.condition.input_scale), model)
        return super().evaluate(scaled, epoch=epoch, cfg=cfg, ctx=ctx, progress=progress)

    def on_best(self, out, epoch, val, artifacts, cfg) -> None:
        """No confusion matrix: a drawing costs a second, more than a quarter pass of training."""

    def checkpoint_fields(self) -> dict:
        fields = super().checkpoint_fields()
        fields["meta"] = {**fields["meta"], "activation": self.activation, "condition": self.condition.name,
                          "input_scale": self.condition.input_scale, "parts_per_pass": self.parts}
        return fields


def train_errors(out: Path, activation: str, condition: Condition, *, seed: int, passes: int,
                 progress: bool | None) -> list[float]:
    """Training error after each quarter pass (running error over that quarter's batches); a run
    that diverges stops there (its curve ends)."""
    from cnnkit.train.runner import fit

    cfg = TrainConfig(data="digits", model="small_cnn", model_options=dict(NET), out=str(out),
                      epochs=passes * PARTS, batch_size=32, lr=condition.lr, momentum=0.9, weight_decay=0.0,
                      schedule="none", seed=seed, device="cpu")
    try:
        fit(cfg, resume=(out / "last.safetensors").exists(), progress=progress,
            task=ActivationTask(activation, condition))
    except TrainingError as exc:
        log.warning("%s: %s", out, exc)
    if not (out / "metrics.csv").exists():
        return []
    with open(out / "metrics.csv", newline="") as f:
        return [1 - float(row["train_acc1"]) for row in csv.DictReader(f)]


def passes_to(errors: list[float], threshold: float = THRESHOLD) -> float | None:
    """Passes over the training set until the quarter-pass training error first is <= threshold."""
    for i, e in enumerate(errors, start=1):
        if e <= threshold:
            return i / PARTS
    return None


def build(out: Path, *, quick: bool, seed: int, progress: bool | None) -> Section:
    seeds = [seed] if quick else [seed, seed + 1, seed + 2]
    passes = {c.name: QUICK_PASSES if quick else c.full_passes for c in CONDITIONS}
    curves: dict[tuple[str, str, int], list[float]] = {}
    with one_thread(), quiet_runner():
        for cond in CONDITIONS:
            n = passes[cond.name]
            for s in seeds:
                for act in ("relu", "tanh"):
                    run = out / "runs" / KEY / f"{cond.name}-{act}-seed{s}-{n}passes"
                    curves[cond.name, act, s] = train_errors(run, act, cond, seed=s, passes=n, progress=progress)
    rows, ratios = [], {}
    for cond in CONDITIONS:
        cond_ratios, n = [], passes[cond.name]
        for s in seeds:
            r, t = (passes_to(curves[cond.name, a, s]) for a in ("relu", "tanh"))
            ratio = _ratio(r, t, n)
            cond_ratios.append(ratio)
            rows.append([cond.name, s, _passes(r, n), _passes(t, n), ratio[1]])
        ratios[cond.name] = cond_ratios
    figure = f"{KEY}_curves.png"
    _plot(out / figure, curves, seeds, passes)
    write_json_atomic(out / "runs" / KEY / "results.json", {
        "threshold": THRESHOLD, "passes": passes,
        "runs": [{"condition": c, "activation": a, "seed": s, "train_error": e,
                  "passes_to_threshold": passes_to(e)} for (c, a, s), e in curves.items()]})

    paper = ratios["paper"]
    measured = "; ".join(text for _, text in paper)
    if len(paper) > 1 and all(v is not None for v, _ in paper):
        measured += f" (mean {sum(v for v, _ in paper) / len(paper):.2f}x)"
    numbers = [Number("ReLU speed-up to 25% training error (tanh passes / ReLU passes)", "about 6x (CIFAR-10)",
                      measured, None, "digits, not CIFAR-10, and a smaller net: a different experiment; "
                      f"'paper' condition, {passes['paper']} passes at quarter-pass resolution, one ratio per "
                      "seed, '>' where tanh did not get there in that time; the ratio depends on learning rate, "
                      "initialisation and data, so a match in size is partly luck")]
    markdown = f"""The slide puts tanh ("very bad, slow to train") beside the ReLU ("very good, quick to train"):
Krizhevsky et al. (2012, Fig. 1) trained a four-layer convolutional net on CIFAR-10 and it reached 25%
training error six times faster with ReLUs than with tanh.

**What was run.** `small_cnn` with three 5x5 conv + max-pool blocks (16, 32, 32 maps, padded) and one FC
layer, on the digits (8x8 upsampled to 32x32; {' and '.join(f"{n} passes ({c})" for c, n in passes.items())}
over the 1438 training images, batches
of 32, SGD with momentum 0.9, no weight decay, constant learning rate). Each pair of runs shares its
initial weights and its batches; only the non-linearity differs. The training error is the running error
over each quarter pass. Seeds: {', '.join(map(str, seeds))}. Two conditions:

- **paper** ({CONDITIONS[0].what}; learning rate {CONDITIONS[0].lr:g}): the scale of the paper, where
  tanh units start saturated;
- **unit** ({CONDITIONS[1].what}; learning rate {CONDITIONS[1].lr:g}): a modern preprocessing and
  initialisation.

{table(["condition", "seed", "ReLU: passes to 25%", "tanh: passes to 25%", "tanh / ReLU"], rows)}

![training error]({figure})

**Result.** At the paper's scale {_verdict(paper)}; the lecture quotes about 6x on CIFAR-10. The
reason is saturation: with inputs of order 100 and the paper's initialisation the tanh units sit on their
flat tails, where the gradient vanishes, while a ReLU's gradient is 1 wherever it is active; the tanh net
stays near chance (90% error) for passes before it starts to learn (figure, left). With
unit-scale inputs and Glorot initialisation {_verdict(ratios["unit"])}. The "6x" is a property of the
setting (input scale, initialisation, depth, dataset), not a constant. This is a different dataset and
net from the paper's, so the number is not compared for agreement.
"""
    return Section(key=KEY, title="Choice of activation function", markdown=markdown, figures=[figure],
                   numbers=numbers, command=f"cnnkit lecture --only {KEY}")


def _verdict(ratios: list[tuple[float | None, str]]) -> str:
    """One sentence on a condition's tanh / ReLU ratios (None: not measurable, '>' when tanh never got there)."""
    texts = "; ".join(text for _, text in ratios)
    values = [v if v is not None else (math.inf if text.startswith(">") else math.nan) for v, text in ratios]
    if all(v > 1.5 for v in values):
        return f"ReLU is clearly quicker (tanh / ReLU = {texts})"
    if all(v <= 1 for v in values):
        return f"tanh is not slower (tanh / ReLU = {texts})"
    return f"neither is consistently quicker (tanh / ReLU = {texts})"


def _passes(p: float | None, passes: int) -> str:
    return f"{p:g}" if p is not None else f"> {passes} (not reached)"


def _ratio(relu: float | None, tanh: float | None, passes: int) -> tuple[float | None, str]:
    if relu is None:
        return None, "n/a (ReLU did not reach it)"
    if tanh is None:
        return None, f"> {passes / relu:.1f}x"
    return tanh / relu, f"{tanh / relu:.2f}x"


def _plot(path: Path, curves, seeds, passes) -> None:
    from cnnkit.train.plots import plt, save_figure

    fig, axes = plt.subplots(1, len(CONDITIONS), figsize=(5 * len(CONDITIONS), 3.8), sharey=True,
                             gridspec_kw={"width_ratios": [1.4, 1]})
    for ax, cond in zip(axes, CONDITIONS):
        for act, colour in (("relu", "tab:blue"), ("tanh", "tab:red")):
            for s in seeds:
                errors = curves[cond.name, act, s]
                x = [(i + 1) / PARTS for i in range(len(errors))]
                ax.plot(x, errors, "o-" if s == seeds[0] else "-", color=colour, alpha=1 if s == seeds[0] else 0.4,
                        label=("ReLU" if act == "relu" else "tanh") if s == seeds[0] else None, markersize=3)
        ax.axhline(THRESHOLD, color="grey", linestyle="--", linewidth=1, label="25% (the paper's threshold)")
        ax.set(title=f"{cond.name}: {cond.what}", xlabel="passes over the training set", xlim=(0, passes[cond.name]),
               ylim=(0, 1))
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training error")
    axes[0].legend()
    fig.suptitle("small_cnn on the digits: the same net, weights and batches, ReLU vs tanh")
    save_figure(fig, path)
