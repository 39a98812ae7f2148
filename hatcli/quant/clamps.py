"""What a fused clamp (ReLU, ReLU6, hardtanh, clamp, clamp_min) means on an integer grid, shared
by the integer program and the compiler; torch-free, so the compiler can use it without torch.

A clamp fused after a conv / linear / add is applied to the requantized integers at its bounds
quantized on the output grid. Rounding is monotone, so clamping the rounded integers at the
rounded bounds gives exactly the rounded clamped value: the float model, the integer program and
the artifact agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ONNX_CLAMPS = ("Relu", "Clip")
"""The ONNX ops a fused clamp exports to (`hatcli.quant.op_sets.CLAMP_OPS` on the aten side)."""


@dataclass(frozen=True)
class ClampBounds:
    """The real-valued bounds of a clamp (None: unbounded on that side)."""

    low: float | None
    high: float | None

    def on_grid(self, scale: float, zero: int, qmin: int, qmax: int) -> tuple[int, int]:
        """The bounds as integers of the output grid (scale, zero point, range): each bound quantized
        the way QuantizeLinear quantizes a constant (float32 division, ties to even), then held
        inside [qmin, qmax]."""
        def quantized(value: float | None, default: int) -> int:
            if value is None:
                return default
            if math.isinf(value):
                return qmin if value < 0 else qmax
            with np.errstate(over="ignore"):
                steps = np.rint(np.float32(value) / np.float32(scale))
            if not np.isfinite(steps):
                return qmin if steps < 0 else qmax
            return int(min(max(int(steps) + zero, qmin), qmax))

        return quantized(self.low, qmin), quantized(self.high, qmax)

    def as_float(self) -> tuple[float, float]:
        """(low, high) with -inf / inf for the open sides."""
        return (-math.inf if self.low is None else self.low, math.inf if self.high is None else self.high)
