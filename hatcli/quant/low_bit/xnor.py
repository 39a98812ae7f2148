"""XNOR-Net (Rastegari et al., 2016) and XNOR-Net++ (Bulat & Tzimiropoulos, 2019): binary
weights with a per-channel scale, sign activations.

- weights: w_b = alpha * sign(w) (0 counts as +1), alpha per output channel: the mean |w| of the
  channel (XNOR-Net) or a learned scale initialised to it (XNOR-Net++); the straight-through
  estimator passes the gradient to w. Codes +-1 on the scale alpha: a subset of int8.
- activations: sign(x) in {-1, 0, +1} (`torch.sign`, and 0 only where the int8 input code is 0,
  exactly as the integer program computes it), with the clipped straight-through estimator
  (gradient 1 where |x| <= 1). The sign is an op of its own in the integer program and the
  artifact (`explicit_op`: a 256-entry table on the int8 input), its result on the grid [-1, 1]
  with scale 1. XNOR-Net's per-position activation scale K is left out, as in XNOR-Net++ (with
  BatchNorm folded after the convolution it is one more per-channel factor).
"""

from __future__ import annotations

import torch

from hatcli.quant.low_bit.fake_quant import (
    EPS,
    GridFakeQuantize,
    channel_view,
    expand_groups,
    per_output_channel,
)
from hatcli.quant.low_bit.ste import binary_sign, sign_ste


class XnorWeightFakeQuantize(GridFakeQuantize):
    """alpha * sign(w), alpha = mean |w| per output channel (or group), or learned (`learned`)."""

    def __init__(self, bits: int = 1, groups: int = 0, learned: bool = False) -> None:
        super().__init__(-1, 1, 1, per_channel=True, groups=groups)
        self.learned = learned
        if learned:
            self.alpha = torch.nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("alpha", torch.ones(1))
        self.register_buffer("channels", torch.tensor(1, dtype=torch.int64))

    def _mean_abs(self, w: torch.Tensor) -> torch.Tensor:
        return per_output_channel(w.abs(), self.groups).mean(1)

    def observe(self, w: torch.Tensor) -> None:
        """alpha := mean |w| per step."""
        self.channels.fill_(w.shape[0])
        self.alpha.data = self._mean_abs(w).clamp(min=EPS).float()

    def grid_scale(self) -> torch.Tensor:
        """alpha per output channel."""
        return expand_groups(self.alpha.clamp(min=EPS), int(self.channels))

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """alpha * sign(w) with the straight-through estimator."""
        if self.learned:
            alpha = self.alpha + (self.alpha.clamp(min=EPS) - self.alpha).detach()
        else:
            alpha = self._mean_abs(w).clamp(min=EPS)
            with torch.no_grad():
                self.alpha.data = alpha.detach().float()
        signs = w + (binary_sign(w) - w).detach()
        return channel_view(expand_groups(alpha, w.shape[0]), w) * signs


class SignFakeQuantize(GridFakeQuantize):
    """sign(x) on the grid [-1, 1] with scale 1; clipped straight-through gradient."""

    explicit_op = torch.ops.aten.sign.default

    def __init__(self, bits: int = 1, signed: bool = True, clip: float = 1.0) -> None:
        super().__init__(-1, 1, 1)
        self.clip = clip

    def grid_scale(self) -> torch.Tensor:
        """1: the codes are the signs."""
        return torch.ones(1, device=self.fake_quant_enabled.device)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """torch.sign(x), gradient 1 where |x| <= clip."""
        return sign_ste(x, self.clip)
