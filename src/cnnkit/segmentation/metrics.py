"""Segmentation scores: pixel accuracy, per-class IoU, precision, recall and F1, mean IoU, and for
two classes ROC AUC and the F1-optimal threshold of the positive class.

Pixels whose target is ``ignore_index`` (unlabelled, or outside a field of view) are left out of
every score, as the DRIVE literature scores only inside the FOV mask.

ROC AUC over millions of pixels and thousands of images is computed from a histogram of the
positive-class probability (``ScoreHistogram``, 2^16 equal bins by default): memory is O(bins)
whatever the number of pixels. Pixels in one bin count as tied scores (half a correctly ordered pair,
as ``sklearn.metrics.roc_auc_score`` counts ties), so the AUC is exact for scores that are multiples
of 1 / bins and off by at most the fraction of (positive, negative) pairs sharing a bin otherwise.
"""

from __future__ import annotations

import torch

from cnnkit.segmentation.data import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    valid = target != ignore_index
    t = target[valid].long()
    p = pred[valid].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).view(num_classes, num_classes).cpu()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> list[float]:
    """num / den per class; NaN where den is 0 (the score is undefined, not zero)."""
    return [(n / d).item() if d > 0 else float("nan") for n, d in zip(num.double(), den.double())]


def pixel_accuracy(cm: torch.Tensor) -> float:
    total = cm.sum().item()
    return cm.diag().sum().item() / total if total else float("nan")


def per_class_iou(cm: torch.Tensor) -> list[float]:
    """IoU of each class; NaN for a class absent from both truth and prediction."""
    inter = cm.diag()
    return _ratio(inter, cm.sum(0) + cm.sum(1) - inter)


def per_class_precision(cm: torch.Tensor) -> list[float]:
    """TP / (TP + FP) per class; NaN for a class never predicted."""
    return _ratio(cm.diag(), cm.sum(0))


def per_class_recall(cm: torch.Tensor) -> list[float]:
    """TP / (TP + FN) per class; NaN for a class absent from the truth."""
    return _ratio(cm.diag(), cm.sum(1))


def per_class_f1(cm: torch.Tensor) -> list[float]:
    """F1 (= Dice) per class: 2 TP / (2 TP + FP + FN); NaN for a class absent from truth and prediction."""
    tp = cm.diag()
    return _ratio(2 * tp, cm.sum(0) + cm.sum(1))


def mean_iou(cm: torch.Tensor) -> float:
    ious = [v for v in per_class_iou(cm) if v == v]
    return sum(ious) / len(ious) if ious else float("nan")


def f1_score(cm: torch.Tensor, positive: int = 1) -> float:
    """F1 (= Dice) of the positive class."""
    return per_class_f1(cm)[positive]


class ScoreHistogram:
    """Counts of positive and negative pixels per score bin, for ROC AUC and the best threshold.

    Bin b holds scores in [b / bins, (b + 1) / bins) (1.0 goes to the last bin), so "score >=
    b / bins" selects exactly bins b and up; with a power-of-two ``bins`` that edge is exact in
    floating point.
    """

    def __init__(self, bins: int = 2**16):
        self.bins = bins
        self.counts = torch.zeros(2, bins, dtype=torch.int64)  # row 0 negatives, row 1 positives

    def update(self, scores: torch.Tensor, is_positive: torch.Tensor) -> None:
        """scores in [0, 1] and booleans of the same shape (only the pixels to be scored)."""
        idx = (scores.detach().double() * self.bins).floor().long().clamp_(0, self.bins - 1)
        idx = idx + self.bins * is_positive.long()
        self.counts += torch.bincount(idx.flatten(), minlength=2 * self.bins).view(2, self.bins).cpu()

    def roc_auc(self) -> float:
        """Probability that a random positive pixel scores above a random negative one (ties: half)."""
        neg, pos = self.counts.double()
        n_neg, n_pos = neg.sum().item(), pos.sum().item()
        if n_neg == 0 or n_pos == 0:
            return float("nan")
        pos_above = pos.flip(0).cumsum(0).flip(0) - pos  # positives in strictly higher bins
        return ((neg * (pos_above + 0.5 * pos)).sum() / (n_neg * n_pos)).item()

    def best_threshold(self) -> tuple[float, float]:
        """(threshold, F1): predicting positive when score >= threshold maximises the positive F1.

        Among the bin edges, the middle one of the first run of edges that reach the maximum (they
        all select the same pixels); (nan, nan) when nothing has been counted.
        """
        neg, pos = self.counts
        if self.counts.sum() == 0:
            return float("nan"), float("nan")
        tp = pos.flip(0).cumsum(0).flip(0)  # tp[b]: positives with score >= b / bins
        fp = neg.flip(0).cumsum(0).flip(0)
        fn = pos.sum() - tp
        den = (2 * tp + fp + fn).double()
        f1 = torch.where(den > 0, 2 * tp.double() / den.clamp_min(1), torch.zeros_like(den))
        best = f1.max()
        first = int((f1 == best).nonzero()[0])
        worse = (f1[first:] != best).nonzero()
        last = first + int(worse[0]) - 1 if len(worse) else self.bins - 1
        return (first + last) // 2 / self.bins, best.item()


def best_threshold(source: SegmentationMeter | ScoreHistogram) -> tuple[float, float]:
    """(threshold, F1) maximising the positive class's F1, from a binary meter or a histogram."""
    hist = source.hist if isinstance(source, SegmentationMeter) else source
    if hist is None:
        raise ValueError("best_threshold needs a two-class meter (it keeps the score histogram)")
    return hist.best_threshold()


class SegmentationMeter:
    """Accumulates a confusion matrix over images, and for two classes a histogram of the positive
    class's probability (ROC AUC, best threshold) in O(bins) memory."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, positive: int = 1,
                 bins: int = 2**16):
        if num_classes == 2 and positive not in (0, 1):
            raise ValueError(f"positive class {positive} of a two-class task must be 0 or 1")
        self.num_classes, self.ignore_index, self.positive = num_classes, ignore_index, positive
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.hist = ScoreHistogram(bins) if num_classes == 2 else None

    def update(self, probs: torch.Tensor, target: torch.Tensor, pred: torch.Tensor | None = None) -> None:
        """probs (N, K, H, W) class probabilities; target (N, H, W); pred (N, H, W) the predicted
        labels when they are not the argmax (a threshold)."""
        if pred is None:
            pred = probs.argmax(1)
        self.cm += confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if self.hist is not None:
            valid = target != self.ignore_index
            self.hist.update(probs[:, self.positive][valid], target[valid] == self.positive)

    def compute(self) -> dict:
        cm = self.cm
        out = {"pixel_accuracy": pixel_accuracy(cm), "mean_iou": mean_iou(cm),
               "per_class_iou": per_class_iou(cm), "per_class_precision": per_class_precision(cm),
               "per_class_recall": per_class_recall(cm), "per_class_f1": per_class_f1(cm),
               "confusion_matrix": cm.tolist(), "pixels": int(cm.sum())}
        if self.hist is not None:
            out["positive_class"] = self.positive
            out["f1"] = f1_score(cm, self.positive)
            out["roc_auc"] = self.hist.roc_auc()
            out["best_threshold"], out["best_threshold_f1"] = self.hist.best_threshold()
        return out
