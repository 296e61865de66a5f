"""Segmentation scores: pixel accuracy, per-class IoU, mean IoU, and for two classes F1 and ROC AUC.

Pixels whose target is ``ignore_index`` (unlabelled, or outside a field of view) are left out of
every score, as the DRIVE literature scores only inside the FOV mask.
"""

from __future__ import annotations

import numpy as np
import torch

from cnnkit.data.segmentation import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    valid = target != ignore_index
    t = target[valid].long()
    p = pred[valid].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).view(num_classes, num_classes).cpu()


def pixel_accuracy(cm: torch.Tensor) -> float:
    total = cm.sum().item()
    return cm.diag().sum().item() / total if total else float("nan")


def per_class_iou(cm: torch.Tensor) -> list[float]:
    """IoU of each class; NaN for a class absent from both truth and prediction."""
    inter = cm.diag().double()
    union = cm.sum(0).double() + cm.sum(1).double() - inter
    return [(i / u).item() if u > 0 else float("nan") for i, u in zip(inter, union)]


def mean_iou(cm: torch.Tensor) -> float:
    ious = [v for v in per_class_iou(cm) if v == v]
    return sum(ious) / len(ious) if ious else float("nan")


def f1_score(cm: torch.Tensor, positive: int = 1) -> float:
    """F1 (= Dice) of the positive class."""
    tp = cm[positive, positive].item()
    fp = cm[:, positive].sum().item() - tp
    fn = cm[positive, :].sum().item() - tp
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


class SegmentationMeter:
    """Accumulates a confusion matrix over images, and for two classes the scores for ROC AUC."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """probs (N, K, H, W) class probabilities (or scores); target (N, H, W)."""
        pred = probs.argmax(1)
        self.cm += confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if self.num_classes == 2:
            valid = target != self.ignore_index
            self._scores.append(probs[:, 1][valid].float().cpu().numpy())
            self._labels.append(target[valid].cpu().numpy())

    def compute(self) -> dict:
        out = {"pixel_accuracy": pixel_accuracy(self.cm), "mean_iou": mean_iou(self.cm),
               "per_class_iou": per_class_iou(self.cm)}
        if self.num_classes == 2:
            out["f1"] = f1_score(self.cm)
            labels = np.concatenate(self._labels) if self._labels else np.zeros(0)
            scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
            from sklearn.metrics import roc_auc_score  # imported here: sklearn takes seconds to import

            both = labels.size and 0 < labels.sum() < labels.size
            out["roc_auc"] = float(roc_auc_score(labels, scores)) if both else float("nan")
        return out
