"""Classification metrics: top-k accuracy and error, the confusion matrix, and mean average precision.

Top-1 / top-5 error (the ILSVRC measures the lecture's tables quote) are 1 - top-k accuracy. Mean
average precision is the PASCAL VOC measure for multi-label data (Chatfield et al. 2014 report it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the k highest scores, for each k (k capped at K)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax)
    hit = top.eq(target[:, None])
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


class ClassificationMeter:
    """Running loss, top-1/top-5 accuracy and confusion matrix (rows: truth, columns: prediction)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.loss_sum = 0.0
        self.count = 0
        self.correct = {1: 0, 5: 0}

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss: float | None = None) -> None:
        logits, target = logits.detach().float().cpu(), target.detach().cpu()
        n = target.numel()
        for k, c in topk_correct(logits, target).items():
            self.correct[k] += c
        pred = logits.argmax(1)
        # O(batch) scatter-add: a bincount over K^2 cells would touch 8 MB per step for 1000 classes
        self.confusion.index_put_((target, pred), torch.ones_like(target), accumulate=True)
        if loss is not None:
            self.loss_sum += loss * n
        self.count += n

    def all_reduce(self, device: torch.device) -> ClassificationMeter:
        """Sum the counts of every process of a distributed run (a no-op in one process). In place."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        sums = torch.tensor([self.loss_sum, self.count, self.correct[1], self.correct[5]],
                            dtype=torch.float64, device=device)
        confusion = self.confusion.to(device)
        dist.all_reduce(sums)
        dist.all_reduce(confusion)
        self.loss_sum, self.confusion = float(sums[0]), confusion.cpu()
        self.count, self.correct = int(sums[1]), {1: int(sums[2]), 5: int(sums[3])}
        return self

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"loss": self.loss_sum / n, "acc1": self.correct[1] / n, "acc5": self.correct[5] / n}


def topk_error(result: dict[str, float]) -> dict[str, float]:
    """{'err1', 'err5'} from a result with 'acc1' and 'acc5'."""
    return {"err1": 1 - result["acc1"], "err5": 1 - result["acc5"]}


def average_precisions(scores, targets) -> np.ndarray:
    """Average precision of each class (NaN for a class without positives); ``targets`` (N, K) 0/1."""
    from sklearn.metrics import average_precision_score

    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (N, K)")
    return np.array([average_precision_score(targets[:, k], scores[:, k]) if targets[:, k].any() else np.nan
                     for k in range(scores.shape[1])])


def mean_average_precision(scores, targets) -> float:
    """Mean over classes with at least one positive of the (non-interpolated) average precision."""
    return float(np.nanmean(average_precisions(scores, targets)))
