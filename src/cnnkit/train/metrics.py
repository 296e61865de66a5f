"""Classification metrics: top-k accuracy and the confusion matrix, accumulated over batches."""

from __future__ import annotations

import torch


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
        self.confusion += torch.bincount(target * self.num_classes + pred,
                                         minlength=self.num_classes**2).reshape(self.num_classes, -1)
        if loss is not None:
            self.loss_sum += loss * n
        self.count += n

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"loss": self.loss_sum / n, "acc1": self.correct[1] / n, "acc5": self.correct[5] / n}
