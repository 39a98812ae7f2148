"""Activation observers that clip outliers: `PercentileObserver` and `MseObserver`.

A min/max observer sets the quantization range to the extreme values seen during calibration. One
outlier activation (a single large value among millions) then stretches the grid, and every other
value is rounded to one of the few levels left for the bulk of the data. Both observers here
choose a clipping threshold `t` instead: the grid covers [-t, t] (or [0, t] on the unsigned grid
used after ReLU), values beyond it saturate, and the bulk is represented with a finer step.

Both are subclasses of torchao's per-tensor `MinMaxObserver`, so they still record `min_val` /
`max_val` (which `hatcli.engine.distributed.sync_observers` merges across ranks), work inside
`FakeQuantize`, and honour the dtype, quant_min / quant_max and qscheme they are built with. Each
batch yields one threshold; the running sum and count of those thresholds are buffers
(`clip_sum`, `clip_count`), so they are saved in the state dict (the QAT stage reloads them into a
rebuilt graph) and can be summed across ranks. The threshold used is their mean.

`calculate_qparams` returns the qparams of the observed range [min_val, max_val] intersected with
[-t, t]; before any batch it behaves exactly like `MinMaxObserver`.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torchao.quantization.pt2e import MinMaxObserver

PERCENTILE_SAMPLE = 1 << 20
"""At most this many elements enter the per-batch percentile (a strided subsample beyond)."""

MSE_SAMPLE = 1 << 18
"""At most this many elements enter the per-batch MSE search (a strided subsample beyond)."""

MSE_CANDIDATES = 64
"""Number of thresholds tried by `MseObserver`, evenly spaced in [0.2, 1] x the batch's |x| max."""

MSE_LOW = 0.2
"""Smallest candidate threshold, as a fraction of the batch's |x| max."""


def strided_sample(x: torch.Tensor, limit: int) -> torch.Tensor:
    """`x` flattened, or a deterministic subsample of at most `limit` elements (every k-th one)."""
    flat = x.reshape(-1)
    if flat.numel() <= limit:
        return flat
    stride = math.ceil(flat.numel() / limit)
    return flat[::stride]


class _ClippingObserver(MinMaxObserver):
    """A `MinMaxObserver` that also keeps the running mean of a per-batch clipping threshold."""

    clip_sum: torch.Tensor
    clip_count: torch.Tensor

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        device = self.min_val.device
        # float64: the sum of many thresholds stays exact enough, and sums identically on every rank
        self.register_buffer("clip_sum", torch.tensor(0.0, dtype=torch.float64, device=device))
        self.register_buffer("clip_count", torch.tensor(0.0, dtype=torch.float64, device=device))

    @abstractmethod
    def batch_threshold(self, x: torch.Tensor) -> torch.Tensor:
        """The clipping threshold (a 0-d tensor, > 0) chosen from one batch `x` (float32, non-empty)."""

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """Record the running min / max, and add this batch's threshold to the running sum."""
        if x_orig.numel() == 0:
            return x_orig
        super().forward(x_orig)
        x = x_orig.detach().to(self.min_val.dtype)
        threshold = self.batch_threshold(x)
        self.clip_sum.add_(threshold.to(self.clip_sum.device, torch.float64))
        self.clip_count.add_(1.0)
        return x_orig

    def threshold(self) -> torch.Tensor | None:
        """The clipping threshold t (mean of the per-batch thresholds), or None before any batch."""
        if float(self.clip_count) <= 0:
            return None
        return (self.clip_sum / self.clip_count).to(self.min_val.dtype)

    def clipped_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[min_val, max_val] intersected with [-t, t]; 0 stays inside (every grid holds 0).

        On the unsigned grid after ReLU min_val >= 0, so the range is [0, t] intersected with
        [min_val, max_val] and the zero point stays 0.
        """
        t = self.threshold()
        if t is None:
            return self.min_val, self.max_val
        lo = torch.clamp(torch.maximum(self.min_val, -t), max=0.0)
        hi = torch.clamp(torch.minimum(self.max_val, t), min=0.0)
        return lo, hi

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the clipped range (the parent's until a batch was seen)."""
        if float(self.clip_count) <= 0:
            return super().calculate_qparams()
        lo, hi = self.clipped_range()
        return self._calculate_qparams(lo, hi)

    @torch.jit.export
    def reset_min_max_vals(self) -> None:
        """Forget the observed range and the thresholds."""
        super().reset_min_max_vals()
        self.clip_sum.zero_()
        self.clip_count.zero_()

    def extra_repr(self) -> str:
        t = self.threshold()
        return f"{super().extra_repr()}, threshold={None if t is None else float(t)}"


class PercentileObserver(_ClippingObserver):
    """Clips at the mean over batches of the `percentile`-th percentile of |x|.

    With the default 99.99 the largest 0.01% of magnitudes (the outliers) saturate and the grid
    spends its levels on the other 99.99%. It is cheap (one k-th value per batch, on a strided
    subsample of at most ~1M elements) but the percentile is a fixed guess: too low and real
    signal saturates, too high and the outliers still set the step. `percentile=100` keeps the
    per-batch maximum (the mean of the batch maxima, not their maximum).
    """

    def __init__(self, percentile: float = 99.99, **kwargs: object) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(**kwargs)
        self.percentile = float(percentile)

    def batch_threshold(self, x: torch.Tensor) -> torch.Tensor:
        """The `percentile` of |x| on a strided subsample (kthvalue: no size limit, unlike quantile)."""
        sample = strided_sample(x, PERCENTILE_SAMPLE).abs()
        n = sample.numel()
        k = min(max(math.ceil(self.percentile / 100.0 * n), 1), n)
        return sample.kthvalue(k).values

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, {super().extra_repr()}"


class MseObserver(_ClippingObserver):
    """Clips at the mean over batches of the threshold that minimises quantization MSE.

    Clipping trades two errors: a small threshold saturates the large values (clipping error), a
    large one makes the step coarse for everything else (rounding error). For each batch this
    tries 64 thresholds in [0.2, 1] x max|x| and keeps the one whose quantize-dequantize on the
    observer's own grid (its quant_min / quant_max and qscheme) has the lowest mean squared
    error on that batch (a strided subsample of at most ~256k elements). Unlike a percentile it
    adapts to the distribution: with no outliers it keeps (nearly) the full range.
    """

    def __init__(self, num_candidates: int = MSE_CANDIDATES, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.num_candidates = int(num_candidates)

    def _grid(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and zero points (float) of ranges [lo, hi] (1-d), as `_calculate_qparams` computes them."""
        qmin, qmax = self.quant_min, self.quant_max
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        if self.qscheme == torch.per_tensor_symmetric:
            scale = torch.clamp(torch.maximum(-lo, hi) / (float(qmax - qmin) / 2), min=float(self.eps))
            zero = 0.0
            if self.dtype in (torch.quint8, torch.uint8):
                zero = float((qmin + qmax) // 2) if self.has_customized_qrange else 128.0
            elif self.dtype == torch.uint16:
                zero = float(2**15)
            return scale, torch.full_like(scale, zero)
        scale = torch.clamp((hi - lo) / float(qmax - qmin), min=float(self.eps))
        zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
        return scale, zero

    def batch_threshold(self, x: torch.Tensor) -> torch.Tensor:
        """The candidate threshold with the lowest quantize-dequantize MSE on this batch."""
        lo_x, hi_x = torch.aminmax(x)
        absmax = torch.maximum(-lo_x, hi_x)
        sample = strided_sample(x, MSE_SAMPLE)
        fractions = torch.linspace(MSE_LOW, 1.0, self.num_candidates, device=x.device, dtype=x.dtype)
        candidates = fractions * absmax
        scale, zero = self._grid(torch.maximum(lo_x, -candidates), torch.minimum(hi_x, candidates))
        errors = []
        for s, z in zip(scale.split(8), zero.split(8)):  # 8 candidates at a time bounds the memory
            s, z = s[:, None], z[:, None]
            y = sample[None, :] / s  # in place from here: one buffer per chunk
            y.add_(z).round_().clamp_(self.quant_min, self.quant_max).sub_(z).mul_(s).sub_(sample[None, :])
            errors.append(y.square_().mean(dim=1))
        best = torch.argmin(torch.cat(errors))
        threshold = candidates[best]
        # an all-zero batch: keep a positive threshold so the mean stays meaningful
        return torch.where(threshold > 0, threshold, torch.full_like(threshold, float(self.eps)))

    def extra_repr(self) -> str:
        return f"num_candidates={self.num_candidates}, {super().extra_repr()}"


OBSERVERS: dict[str, type[MinMaxObserver]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MseObserver,
}
"""Activation observer classes by their recipe name (`calibration.observer`)."""


def observer_class(name: str) -> type[MinMaxObserver]:
    """The activation observer class for a recipe name (`minmax`, `percentile`, `mse`)."""
    try:
        return OBSERVERS[name]
    except KeyError:
        raise ValueError(f"unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}") from None
