"""PACT (Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural Networks", 2018).

The activation is clipped at a learned level alpha and quantized uniformly on [0, alpha]:

    y = clamp(x, 0, alpha),   y_q = round(y * n / alpha) * alpha / n,   n = 2**b - 1

with the straight-through estimator for the rounding, so dy_q/dx = 1 on [0, alpha) and the
gradient of alpha is the PACT clip gradient: 1 where x >= alpha, 0 elsewhere. A signed input
(no ReLU before the layer) is clipped to [-alpha, alpha] on the symmetric grid. Calibration
initialises alpha to the clip with the least squared error on the calibration values (the mean
over batches of each batch's best clip, `ClippedGridFakeQuantize`), so that it clips from the
start and gets PACT's gradient. Weights use DoReFa's quantizer, as in the paper (`hatcli.quant.low_bit.dorefa`).
"""

from __future__ import annotations

import torch

from hatcli.quant.low_bit.fake_quant import EPS, ClippedGridFakeQuantize
from hatcli.quant.low_bit.grids import symmetric_range, unsigned_range


class PactFakeQuantize(ClippedGridFakeQuantize):
    """Learned clipping level `alpha` (a parameter), uniform grid on [0, alpha] or [-alpha, alpha]."""

    def __init__(self, bits: int, signed: bool) -> None:
        qmin, qmax = symmetric_range(bits) if signed else unsigned_range(bits)
        super().__init__(qmin, qmax, bits, signed)
        self.alpha = torch.nn.Parameter(torch.ones(1))

    def observe(self, x: torch.Tensor) -> None:
        """alpha: the least-squared-error clip of the grid (`ClippedGridFakeQuantize.observed_range`)."""
        self.alpha.data = self.observed_range(x)

    def grid_scale(self) -> torch.Tensor:
        """alpha / Q_p."""
        return self.alpha.clamp(min=EPS) / max(1, self.quant_max)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Clip at alpha (PACT's gradient for alpha), then round on the grid (STE)."""
        return self.clip_and_round(x, self.alpha + (self.alpha.clamp(min=EPS) - self.alpha).detach())
