"""How far one tensor is from another, summed batch by batch: cosine similarity, SQNR in dB, mean
absolute difference (L1) and the largest difference in quantization steps of the layer's output
grid; and what a layer's float values look like against the grid its output is stored on.

Everything is accumulated in float64 over the images seen, so the figures of a layer are those
of all images together, not an average of per-batch figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hatcli.quant.layer_graph import OutputGrid
from hatcli.quant.sensitivity import sqnr_db

RANGE_SAMPLE = 1 << 16
"""Values of each layer kept (a strided sample per batch) to read the percentiles of its range."""


def rounded(value: float, digits: int = 4) -> float | None:
    """`value` rounded for the report; None for inf / nan (JSON has neither)."""
    return round(value, digits) if math.isfinite(value) else None


@dataclass
class Agreement:
    """How close `test` tensors are to `reference` ones, over every element seen."""

    dot: float = 0.0
    ref_sq: float = 0.0
    test_sq: float = 0.0
    noise_sq: float = 0.0
    abs_sum: float = 0.0
    count: int = 0
    max_abs: float = 0.0
    max_steps: float | None = None

    def update(self, reference: torch.Tensor, test: torch.Tensor, step: torch.Tensor | None = None) -> None:
        """Fold one batch in; `step` (a scalar or per-channel tensor shaped to divide the
        difference) turns the largest difference into output steps."""
        ref, tst = reference.double(), test.double()
        if ref.shape != tst.shape or ref.numel() == 0:
            return
        diff = tst - ref
        self.dot += float((ref * tst).sum())
        self.ref_sq += float((ref * ref).sum())
        self.test_sq += float((tst * tst).sum())
        self.noise_sq += float((diff * diff).sum())
        self.abs_sum += float(diff.abs().sum())
        self.count += ref.numel()
        self.max_abs = max(self.max_abs, float(diff.abs().max()))
        if step is not None:
            steps = float((diff.abs() / step.to(torch.float64)).max())
            self.max_steps = steps if self.max_steps is None else max(self.max_steps, steps)

    @property
    def cosine(self) -> float:
        """Cosine similarity of the flattened tensors (1: same direction; 1 when both are zero)."""
        if self.ref_sq <= 0 or self.test_sq <= 0:
            return 1.0 if self.ref_sq == self.test_sq else 0.0
        return self.dot / math.sqrt(self.ref_sq * self.test_sq)

    @property
    def sqnr_db(self) -> float:
        """``10 log10(sum ref^2 / sum (test - ref)^2)``; inf when they are equal."""
        return sqnr_db(self.ref_sq, self.noise_sq)

    @property
    def l1(self) -> float:
        """Mean absolute difference per element."""
        return self.abs_sum / self.count if self.count else 0.0

    def to_dict(self) -> dict[str, float | None]:
        """cosine, sqnr_db, l1 and max_diff_steps, rounded (None where infinite or unknown)."""
        return {"cosine": rounded(self.cosine, 6), "sqnr_db": rounded(self.sqnr_db, 2), "l1": rounded(self.l1, 6),
                "max_diff_steps": None if self.max_steps is None else rounded(self.max_steps, 2)}


@dataclass
class OutputAgreement:
    """How close a model's output is to the reference's, against how much the reference output
    varies: the signal is measured around the output's mean value, so a large offset that every
    element shares (a classifier's or a detector's prior logit) does not hide a difference in
    what the output says."""

    total: float = 0.0
    """Sum of the reference output's elements."""
    ref_sq: float = 0.0
    noise_sq: float = 0.0
    count: int = 0

    def update(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        """Fold one batch in."""
        ref, tst = reference.double(), test.double()
        if ref.shape != tst.shape or ref.numel() == 0:
            return
        self.total += float(ref.sum())
        self.ref_sq += float((ref * ref).sum())
        self.noise_sq += float(((tst - ref) ** 2).sum())
        self.count += ref.numel()

    @property
    def sqnr_db(self) -> float:
        """``10 log10(sum (ref - mean ref)^2 / sum (test - ref)^2)``; inf when they are equal."""
        if not self.count:
            return math.inf
        spread = self.ref_sq - self.total * self.total / self.count
        return sqnr_db(max(spread, 0.0), self.noise_sq)


@dataclass
class OutputsAgreement:
    """Agreement of a model's outputs, one `OutputAgreement` per output tensor."""

    outputs: list[OutputAgreement] = field(default_factory=list)

    def update(self, reference: list[torch.Tensor], test: list[torch.Tensor]) -> None:
        """Fold one batch of every output in."""
        while len(self.outputs) < len(reference):
            self.outputs.append(OutputAgreement())
        for agreement, ref, tst in zip(self.outputs, reference, test):
            agreement.update(ref, tst)

    @property
    def sqnr_db(self) -> float:
        """The SQNR of all outputs together: each output's spread and difference summed, so an
        output that hardly varies (a detector's coarsest map on a few images) weighs little."""
        if not any(a.count for a in self.outputs):
            return math.inf
        spread = sum(max(a.ref_sq - a.total * a.total / a.count, 0.0) for a in self.outputs if a.count)
        return sqnr_db(spread, sum(a.noise_sq for a in self.outputs))


def image_differences(reference: list[torch.Tensor], test: list[torch.Tensor]) -> list[tuple[float, float]]:
    """Per image of the batch: (the SQNR of `test` against `reference`, the root mean square of
    their difference), over all outputs together."""
    signal = noise = None
    elements = 0
    for ref, tst in zip(reference, test):
        ref, tst = ref.double().reshape(ref.shape[0], -1), tst.double().reshape(tst.shape[0], -1)
        s, n = (ref * ref).sum(1), ((tst - ref) ** 2).sum(1)
        signal, noise = (s, n) if signal is None else (signal + s, noise + n)
        elements += ref.shape[1]
    if signal is None:
        return []
    return [(sqnr_db(float(s), float(n)), math.sqrt(float(n) / max(1, elements))) for s, n in zip(signal, noise)]


def grid_step(grid: OutputGrid | None, like: torch.Tensor, accumulator_step: torch.Tensor | None) -> torch.Tensor | None:
    """The step of a layer's output shaped to divide a tensor `like` it: the grid's scale, or a
    per-channel accumulator step (channels on dim 1, the last dim of an [N, C] output)."""
    if grid is not None:
        return torch.tensor(grid.scale, dtype=torch.float64)
    if accumulator_step is None:
        return None
    step = accumulator_step.to(torch.float64).reshape(-1)
    if like.dim() <= 2:
        return step
    return step.reshape(1, -1, *([1] * (like.dim() - 2)))


@dataclass
class RangeStats:
    """A layer's float output on the images seen, against the grid its quantized output uses."""

    low: float = math.inf
    high: float = -math.inf
    count: int = 0
    clipped: int = 0
    """Values outside the grid by more than half a step (quantization clips them)."""
    sample: list[torch.Tensor] = field(default_factory=list)

    def update(self, values: torch.Tensor, grid: OutputGrid | None) -> None:
        """Fold one batch of the layer's float output in."""
        flat = values.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        self.low, self.high = min(self.low, float(flat.min())), max(self.high, float(flat.max()))
        self.count += flat.numel()
        if grid is not None:
            half = grid.scale / 2
            self.clipped += int(((flat < grid.low - half) | (flat > grid.high + half)).sum())
        stride = max(1, flat.numel() * 8 // RANGE_SAMPLE)
        self.sample.append(flat[::stride].abs())

    @property
    def clipped_share(self) -> float:
        """The share of values the grid cannot hold (0..1)."""
        return self.clipped / self.count if self.count else 0.0

    def abs_quantile(self, q: float) -> float:
        """The `q` quantile (0..1) of |value| over the sample kept."""
        if not self.sample:
            return 0.0
        values = torch.cat(self.sample)
        if values.numel() > RANGE_SAMPLE:
            values = values[:: values.numel() // RANGE_SAMPLE + 1]
        return float(torch.quantile(values.double(), q))
