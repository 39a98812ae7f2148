"""Top-1 / top-5 accuracy, as percentages (0-100)."""

from __future__ import annotations

import torch


class TopKAccuracy:
    """Accumulates top-1 and top-5 hits over batches of logits and labels."""

    def __init__(self, ks: tuple[int, ...] = (1, 5)) -> None:
        self.ks = ks
        self.hits = {k: 0 for k in ks}
        self.count = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch."""
        logits = torch.as_tensor(logits)
        labels = torch.as_tensor(labels)
        top = logits.topk(min(max(self.ks), logits.shape[-1]), dim=-1).indices
        correct = top.eq(labels.view(-1, 1))
        for k in self.ks:
            self.hits[k] += int(correct[:, :k].any(dim=1).sum())
        self.count += labels.numel()

    def merge_across_ranks(self) -> None:
        """Sum the hits and counts of every process (no-op in a single process)."""
        from hatcli.engine import distributed

        if not distributed.current().enabled:
            return
        totals = torch.tensor([self.count] + [self.hits[k] for k in self.ks], dtype=torch.float64)
        distributed.all_reduce_sum(totals)
        self.count = int(totals[0])
        self.hits = {k: int(totals[i + 1]) for i, k in enumerate(self.ks)}

    def compute(self) -> dict[str, float]:
        """Return `{"top1": ..., "top5": ...}` in percent."""
        if self.count == 0:
            return {f"top{k}": 0.0 for k in self.ks}
        return {f"top{k}": 100.0 * self.hits[k] / self.count for k in self.ks}
