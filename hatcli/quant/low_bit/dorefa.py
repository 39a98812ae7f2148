"""DoReFa-Net (Zhou et al., 2016): tanh-normalised weights and clipped activations.

Weights at k bits, per output channel (BatchNorm is folded into the convolution before QAT, so
each channel is normalised by its own magnitude m = max |w| and scaled back; DoReFa on an unfolded
convolution followed by BatchNorm computes the same up to the BatchNorm's per-channel scale):

    t = tanh(w / m),   u = t / (2 max |t|) + 1/2  in [0, 1],   w_q = m (2 round(u n) / n - 1)

with n = 2**k - 1 and the straight-through estimator for the rounding. `w_q` lies on the odd
multiples of m / n, codes in [-n, n]: at k <= 7 bits a subset of int8 (8-bit DoReFa weights would
need 9 bits, so they are refused).

Activations are clipped and quantized uniformly: DoReFa clips to [0, 1] after a BatchNorm; with the
BatchNorm folded, hat clips to [0, r], r set in calibration to the clip with the least squared
error on the observed values (the mean over batches of each batch's best clip), fixed during QAT
(PACT learns it instead), and the gradient is 1 inside the clip.
"""

from __future__ import annotations

import torch

from hatcli.quant.low_bit.fake_quant import (
    EPS,
    ClippedGridFakeQuantize,
    GridFakeQuantize,
    channel_view,
    expand_groups,
    per_output_channel,
)
from hatcli.quant.low_bit.grids import symmetric_range, unsigned_range
from hatcli.quant.low_bit.ste import round_ste


class DorefaWeightFakeQuantize(GridFakeQuantize):
    """DoReFa's k-bit weights, normalised per output channel (or group); see the module docstring."""

    def __init__(self, bits: int, groups: int = 0) -> None:
        levels = 2 ** bits - 1
        super().__init__(-levels, levels, bits, per_channel=True, groups=groups)
        self.levels = levels
        self.register_buffer("magnitude", torch.ones(1))
        """m per output channel, as of the last forward (what the grid scale m / n is made of)."""

    def _magnitude(self, w: torch.Tensor) -> torch.Tensor:
        per_step = per_output_channel(w.detach().abs(), self.groups).amax(1)
        return expand_groups(per_step, w.shape[0]).clamp(min=EPS)

    def observe(self, w: torch.Tensor) -> None:
        """Record the per-channel magnitude (nothing is learned)."""
        self.magnitude = self._magnitude(w).float()

    def grid_scale(self) -> torch.Tensor:
        """m / n per output channel."""
        return self.magnitude / self.levels

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """DoReFa's tanh normalisation and k-bit rounding, per output channel."""
        magnitude = self._magnitude(w)
        with torch.no_grad():
            self.magnitude = magnitude.float()
        m = channel_view(magnitude, w)
        t = torch.tanh(w / m)
        t_max = channel_view(expand_groups(per_output_channel(t.detach().abs(), self.groups).amax(1), w.shape[0]), w)
        u = t / (2 * t_max.clamp(min=EPS)) + 0.5
        q = round_ste(u * self.levels) / self.levels
        return m * (2 * q - 1)


class DorefaActivationFakeQuantize(ClippedGridFakeQuantize):
    """Clipped activations on a uniform k-bit grid over [0, r] (or [-r, r]); r fixed at calibration."""

    def __init__(self, bits: int, signed: bool) -> None:
        qmin, qmax = symmetric_range(bits) if signed else unsigned_range(bits)
        super().__init__(qmin, qmax, bits, signed)
        self.register_buffer("clip", torch.ones(1))

    def observe(self, x: torch.Tensor) -> None:
        """r: the least-squared-error clip of the grid (`ClippedGridFakeQuantize.observed_range`)."""
        self.clip.copy_(self.observed_range(x))

    def grid_scale(self) -> torch.Tensor:
        """r / Q_p."""
        return self.clip / max(1, self.quant_max)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """clamp to the range, round on the grid (STE; gradient 1 inside the range)."""
        return self.clip_and_round(x, self.clip)
