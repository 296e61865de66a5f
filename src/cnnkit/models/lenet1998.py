"""LeNet-5 as the paper builds it: Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning
applied to document recognition", Proc. IEEE 86(11):2278-2324, 1998, Sec. II-B and Fig. 2.

32 x 32 input; every layer up to F6 squashes with f(a) = A tanh(S a), A = 1.7159, S = 2/3 (Sec. II-B,
Appendix A):

    C1 6@5x5 -> S2 -> C3 16@5x5 (Table I) -> S4 -> C5 120@5x5 -> F6 84 -> RBF output, 10 units

- S2/S4 ("trainable subsampling"): per map, the sum of each 2x2 non-overlapping window times one
  trainable coefficient, plus one trainable bias, then the squashing function (:class:`Subsampling`).
- C3 (:class:`SparseConv2d`): each of the 16 maps reads only the S2 maps Table I gives it: maps 0-5
  three contiguous ones, 6-11 four contiguous, 12-14 four discontinuous, 15 all six (``TABLE_I``).
- The output layer (:class:`EuclideanRBF`): y_i = sum_j (x_j - w_ij)^2 (eq. 7) with fixed,
  untrained w_i in {-1, +1}^84: 7 x 12 bitmaps of the digits (``DIGIT_BITMAPS``). These bitmaps are
  our drawing in the spirit of the paper's Fig. 3; the paper's exact bitmaps are not reproduced.
  They are a buffer, not parameters. More than 10 classes get random +-1 codes for the extra ones
  (the alternative the paper mentions), drawn from a fixed seed.
- Initialisation (Appendix A): every weight and bias uniform in +-2.4 / F_i, F_i the fan-in of the
  unit it belongs to (S2/S4: 4, C3: 25 x the maps a C3 map reads, C5: 400, F6: 120). The Appendix
  speaks of weights; we draw the biases the same way (a bias as a weight from a constant input),
  F_i not counting it.

Trainable parameters, as the paper counts them: C1 156 + S2 12 + C3 1,516 + S4 32 + C5 48,120
+ F6 10,164 = 60,000. The paper's connection counts (C1 122,304, S2 5,880, C3 151,600, S4 2,000) are
the summary's MACs plus one bias connection per unit.

Deviation, stated: the forward pass returns scores = -y (negated RBF distances), so the package's
softmax cross-entropy trains the net. The paper's loss (Sec. II-C, eq. 9) is the penalty
E = y_D + log(exp(-j) + sum_i exp(-y_i)), which in these scores is cross-entropy over the 10 scores
plus one constant "rubbish" score -j; :func:`paper_loss` computes it, and cross-entropy is its
j -> infinity limit. The paper trains with stochastic diagonal Levenberg-Marquardt (Appendix C), not
plain SGD, and maps background/ink to -0.1/1.175 (Sec. II-B) where cnnkit subtracts a mean image.
The RBF distances send far larger gradients back than a small linear head, so plain SGD needs a
smaller rate than for ``lenet5``: on digits, ``--lr 0.01`` trains, the default 0.05 saturates the
squashing units and stays at chance. ``lenet5`` (lenet.py) is the simplified modern variant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.models.base import ClassifierNet
from cnnkit.models.registry import register_model

PAPER = ("LeCun, Bottou, Bengio, Haffner. Gradient-based learning applied to document recognition. "
         "Proc. IEEE 1998")

# Table I: row i is S2 map i, column j is C3 map j; "X" where C3 map j reads S2 map i.
TABLE_I = (
    "X   XXX  XXXX XX",
    "XX   XXX  XXXX X",
    "XXX   XXX  X XXX",
    " XXX  XXXX  X XX",
    "  XXX  XXXX XX X",
    "   XXX  XXXX XXX",
)

# 7 wide x 12 high, "#" = +1, "." = -1; rows 10-11 are left for descenders as in Fig. 3.
DIGIT_BITMAPS = {
    0: [".......", "..###..", ".##.##.", "##...##", "##...##", "##...##",
        "##...##", "##...##", ".##.##.", "..###..", ".......", "......."],
    1: [".......", "...##..", "..###..", ".####..", "...##..", "...##..",
        "...##..", "...##..", "...##..", ".######", ".......", "......."],
    2: [".......", ".#####.", "##...##", ".....##", "....##.", "...##..",
        "..##...", ".##....", "##.....", "#######", ".......", "......."],
    3: [".......", "#######", "....##.", "...##..", "..##...", ".####..",
        ".....##", ".....##", "##...##", ".#####.", ".......", "......."],
    4: [".......", "....##.", "...###.", "..####.", ".##.##.", "##..##.",
        "#######", "....##.", "....##.", "....##.", ".......", "......."],
    5: [".......", "#######", "##.....", "##.....", "######.", ".....##",
        ".....##", ".....##", "##...##", ".#####.", ".......", "......."],
    6: [".......", "...###.", "..##...", ".##....", "##.....", "######.",
        "##...##", "##...##", "##...##", ".#####.", ".......", "......."],
    7: [".......", "#######", ".....##", "....##.", "...##..", "...##..",
        "..##...", "..##...", "..##...", "..##...", ".......", "......."],
    8: [".......", ".#####.", "##...##", "##...##", ".#####.", "##...##",
        "##...##", "##...##", "##...##", ".#####.", ".......", "......."],
    9: [".......", ".#####.", "##...##", "##...##", "##...##", ".######",
        ".....##", "....##.", "...##..", ".###...", ".......", "......."],
}
EXTRA_CODES_SEED = 1998  # random +-1 codes for classes beyond the ten digits


def table_i_mask() -> torch.Tensor:
    """(16, 6) bool: ``mask[j, i]`` is True where C3 map j reads S2 map i (Table I transposed)."""
    return torch.tensor([[row[j] == "X" for row in TABLE_I] for j in range(16)], device="cpu")


def rbf_codes(num_classes: int) -> torch.Tensor:
    """(num_classes, 84) parameter vectors of the output units: the digit bitmaps, then random codes."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    drawn = [[1.0 if c == "#" else -1.0 for row in DIGIT_BITMAPS[d] for c in row] for d in range(10)]
    codes = torch.tensor(drawn[:num_classes], device="cpu")
    if num_classes > 10:
        gen = torch.Generator(device="cpu").manual_seed(EXTRA_CODES_SEED)
        extra = torch.randint(0, 2, (num_classes - 10, 84), generator=gen, device="cpu") * 2.0 - 1.0
        codes = torch.cat([codes, extra])
    return codes


def _here() -> torch.device:
    """The device new tensors go to (``meta`` inside ``with torch.device("meta")``)."""
    return torch.empty(0).device


def _uniform_(t: torch.Tensor, fan_in: int | torch.Tensor) -> None:
    """Appendix A: uniform in +-2.4 / F_i (``fan_in`` broadcast over ``t``'s leading dimension)."""
    with torch.no_grad():
        t.uniform_(-1.0, 1.0)
        t.mul_(2.4 / (torch.as_tensor(fan_in, dtype=t.dtype, device=t.device)))


class ScaledTanh(nn.Module):
    """The squashing function f(a) = A tanh(S a): A = 1.7159, S = 2/3 make f(+-1) = +-1 (Appendix A)."""

    def __init__(self, amplitude: float = 1.7159, slope: float = 2.0 / 3.0):
        super().__init__()
        self.amplitude, self.slope = amplitude, slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.amplitude * torch.tanh(self.slope * x)

    def extra_repr(self) -> str:
        return f"amplitude={self.amplitude}, slope={self.slope:.4g}"


class Subsampling(nn.Module):
    """S2/S4: per map, (sum of each 2x2 non-overlapping window) x coefficient + bias (2 parameters/map)."""

    kernel_size = (2, 2)
    stride = (2, 2)

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))
        _uniform_(self.weight, 4)
        _uniform_(self.bias, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        window_sum = F.avg_pool2d(x, 2) * 4
        return window_sum * self.weight[:, None, None] + self.bias[:, None, None]

    def count_macs(self, x: torch.Tensor, y: torch.Tensor) -> int:
        return 4 * (y.numel() // y.shape[0])  # a 2x2 kernel whose four weights are one coefficient

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kernel_size=2, stride=2"


class SparseConv2d(nn.Module):
    """A convolution in which output map j reads only the input maps ``mask[j]`` (C3 with Table I).

    Only the connected kernels are parameters: ``weight`` is (connections, k, k), one kernel per "X"
    of the table, so the parameter count is the paper's. The forward pass scatters them into a dense
    (out, in, k, k) kernel whose unconnected entries are zero and runs one ordinary convolution.
    """

    stride = (1, 1)

    def __init__(self, mask: torch.Tensor, kernel_size: int):
        super().__init__()
        mask = mask.to(device="cpu", dtype=torch.bool)
        self.out_channels, self.in_channels = mask.shape
        self.kernel_size = (kernel_size, kernel_size)
        out_idx, in_idx = mask.nonzero(as_tuple=True)  # row-major: the kernels of map 0, then map 1, ...
        self.register_buffer("out_idx", out_idx.to(_here()), persistent=False)
        self.register_buffer("in_idx", in_idx.to(_here()), persistent=False)
        self.weight = nn.Parameter(torch.empty(len(out_idx), kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(self.out_channels))
        fan_in = mask.sum(1) * kernel_size * kernel_size  # (out,) inputs of one unit of each map
        _uniform_(self.weight, fan_in[out_idx][:, None, None])
        _uniform_(self.bias, fan_in)

    def dense_weight(self) -> torch.Tensor:
        """(out, in, k, k) kernel with zeros where the table has no connection."""
        dense = self.weight.new_zeros(self.out_channels, self.in_channels, *self.kernel_size)
        return dense.index_put((self.out_idx, self.in_idx), self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dense_weight(), self.bias)

    def count_macs(self, x: torch.Tensor, y: torch.Tensor) -> int:
        per_map = y[0, 0].numel()
        return per_map * self.weight.shape[0] * math.prod(self.kernel_size)  # connected kernels only

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"connections={self.weight.shape[0]}")


class EuclideanRBF(nn.Module):
    """Output units y_i = sum_j (x_j - w_ij)^2 with fixed codes w_i; returns the scores -y_i.

    Works on (B, D) and on (B, D, H, W) maps (the fully convolutional net: a score map per class).
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        codes = rbf_codes(num_classes)
        if codes.shape[1] != in_features:
            raise ConfigError(f"the RBF codes are 7x12 = 84 values; this layer reads {in_features}")
        self.register_buffer("codes", codes.to(_here()))  # (K, D): fixed, saved with the model

    @property
    def num_classes(self) -> int:
        return self.codes.shape[0]

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, *S) -> (B, K, *S): squared Euclidean distance to each code (eq. 7)."""
        spatial = (1,) * (x.dim() - 2)
        diff = x.unsqueeze(1) - self.codes.to(x.dtype).view(1, *self.codes.shape, *spatial)  # (B, K, D, *S)
        return diff.pow(2).sum(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.distances(x)

    def count_macs(self, x: torch.Tensor, y: torch.Tensor) -> int:
        return (y.numel() // y.shape[0]) * self.codes.shape[1]

    def extra_repr(self) -> str:
        return f"in_features={self.codes.shape[1]}, num_classes={self.num_classes}, fixed codes"


class LeNet1998(ClassifierNet):
    """A ClassifierNet whose head is the RBF layer (no Linear/Conv to swap): its own class count and reset."""

    @property
    def num_classes(self) -> int:
        return self.classifier.output.num_classes

    def reset_classifier(self, num_classes: int) -> None:
        old = self.classifier.output.codes
        self.classifier.output = EuclideanRBF(old.shape[1], num_classes).to(old.device)


def paper_loss(scores: torch.Tensor, target: torch.Tensor, j: float) -> torch.Tensor:
    """Eq. 9, mean over the batch: y_D + log(exp(-j) + sum_i exp(-y_i)), with ``scores`` = -y.

    That is cross-entropy over the scores and one more, constant score -j (``j`` > 0; the paper does
    not print its value).
    """
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()  # autocast: the loss in float32, as cnnkit's other losses
    rubbish = scores.new_full((scores.shape[0], 1), -float(j))
    return F.cross_entropy(torch.cat([scores, rubbish], 1), target)


@register_model(
    "lenet5_1998",
    paper=PAPER,
    input_size=(1, 32, 32),
    num_classes=10,
    pooling="floor",
    normalisation="none",
    reference_params=60_000,
    notes="the paper's net: Table I C3, trainable subsampling, A tanh(S a), fixed RBF output",
)
def lenet5_1998(num_classes: int = 10, in_chans: int = 1) -> LeNet1998:
    features = nn.Sequential()
    features.add_module("c1", nn.Conv2d(in_chans, 6, 5))  # (B, 6, 28, 28)
    features.add_module("squash1", ScaledTanh())
    features.add_module("s2", Subsampling(6))  # (B, 6, 14, 14)
    features.add_module("squash2", ScaledTanh())
    features.add_module("c3", SparseConv2d(table_i_mask(), 5))  # (B, 16, 10, 10)
    features.add_module("squash3", ScaledTanh())
    features.add_module("s4", Subsampling(16))  # (B, 16, 5, 5)
    features.add_module("squash4", ScaledTanh())
    features.add_module("c5", nn.Conv2d(16, 120, 5))  # (B, 120, 1, 1)
    features.add_module("squash5", ScaledTanh())
    classifier = nn.Sequential()
    classifier.add_module("flatten", nn.Flatten())
    classifier.add_module("f6", nn.Linear(120, 84))
    classifier.add_module("squash6", ScaledTanh())
    classifier.add_module("output", EuclideanRBF(84, num_classes))
    for layer in (features.c1, features.c5, classifier.f6):
        fan_in = layer.weight[0].numel()
        _uniform_(layer.weight, fan_in)
        _uniform_(layer.bias, fan_in)
    return LeNet1998(features, classifier, (in_chans, 32, 32))
