"""Semantic segmentation scores from a confusion matrix: mIoU, per-class IoU, pixel accuracy.

Every score is read off one C x C matrix of pixel counts (rows: ground truth, columns:
prediction) accumulated over the whole evaluation set, as mmsegmentation and the Cityscapes
scripts do: a class's IoU is TP / (TP + FP + FN) over all images together, not a mean of
per-image IoUs. Pixels whose ground truth is the ignore index count nowhere. A class that never
occurs, neither in the ground truth nor in the predictions, has no IoU and is left out of the
mean (it is reported as None), so a small validation set that lacks a class does not score it 0.
"""

from __future__ import annotations

import torch


class ConfusionMatrix:
    """Pixel counts of (ground-truth class, predicted class) over batches of label maps."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predicted: torch.Tensor, truth: torch.Tensor) -> None:
        """Add a batch of predicted and true class maps of the same shape ([N, H, W] ints)."""
        predicted = torch.as_tensor(predicted).reshape(-1).to(torch.int64).cpu()
        truth = torch.as_tensor(truth).reshape(-1).to(torch.int64).cpu()
        if predicted.shape != truth.shape:
            raise ValueError(f"prediction has {predicted.numel()} pixels but the mask {truth.numel()}")
        keep = (truth != self.ignore_index) & (truth >= 0) & (truth < self.num_classes)
        pairs = truth[keep] * self.num_classes + predicted[keep].clamp(0, self.num_classes - 1)
        self.counts += torch.bincount(pairs, minlength=self.num_classes ** 2).reshape(self.num_classes, -1)

    def merge_across_ranks(self) -> None:
        """Sum the counts of every process (no-op in a single process)."""
        from hatcli.engine import distributed

        if not distributed.current().enabled:
            return
        totals = self.counts.to(torch.float64)
        distributed.all_reduce_sum(totals)
        self.counts = totals.round().to(torch.int64)

    def class_iou(self) -> list[float | None]:
        """IoU of every class in percent; None for a class absent from truth and prediction alike."""
        tp = self.counts.diag().to(torch.float64)
        union = self.counts.sum(0).to(torch.float64) + self.counts.sum(1).to(torch.float64) - tp
        return [None if float(u) == 0 else 100.0 * float(t) / float(u) for t, u in zip(tp, union)]

    def compute(self) -> dict[str, float]:
        """`{"mIoU", "pixel_acc", "mean_acc"}` in percent (0 for each when no pixel was counted)."""
        ious = [v for v in self.class_iou() if v is not None]
        total = int(self.counts.sum())
        per_class_truth = self.counts.sum(1)
        accs = [100.0 * float(self.counts[c, c]) / float(n) for c, n in enumerate(per_class_truth.tolist()) if n]
        return {
            "mIoU": sum(ious) / len(ious) if ious else 0.0,
            "pixel_acc": 100.0 * float(self.counts.diag().sum()) / total if total else 0.0,
            "mean_acc": sum(accs) / len(accs) if accs else 0.0,
        }
