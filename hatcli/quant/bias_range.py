"""The int32 bias of a conv / linear: its range, and the record of a bias that saturates it; and
the worst case of a layer's accumulator (an int16 layer's can pass 2^31). Torch-free: the
compiler and `hat check` use it too (`hatcli.quant.bias_saturation` finds the saturating biases
of a prepared graph).

A bias is quantized with the scale ``s_x * s_w`` of its channel. When the weight scale is tiny
(BatchNorm folding of a channel with gamma near 0) a modest bias needs more than 2^31 steps; it
is then held at the range's end. The range is not the full int32: its ends are float32 numbers
(the quantize op clamps in float32, and 2^31 - 1 rounds to 2^31, which wraps to -2^31 when cast),
and they leave room for the largest accumulator an 8-bit layer can reach, so that accumulator
plus bias never leaves int32 and no kernel can wrap it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

INT32_MAX = 2**31 - 1
EIGHT_BIT_PRODUCT = 255 * 127
"""The largest |x * w| of an 8-bit layer: an unsigned activation times an int8 weight."""


def _float32_floor(value: int) -> int:
    """The largest float32-representable integer at most `value` (value > 0)."""
    ulp = 2 ** max(math.floor(math.log2(value)) - 23, 0)
    return value - value % ulp


def bias_limit(fan_in: int) -> int:
    """The largest |int32 bias| of a layer whose accumulator sums `fan_in` products: 2^31 less
    the largest 8-bit accumulator, rounded down to a float32 number."""
    return _float32_floor(max(INT32_MAX - fan_in * EIGHT_BIT_PRODUCT, 2**24))


def accumulator_bound(centred_weights, x_bound: int, bias_bound: int) -> int:
    """The largest |accumulator| a layer can reach: `x_bound` (the largest |q_x - z_x|) times the
    largest per-channel sum of |q_w - z_w| (`centred_weights`: channels x fan-in, numpy or torch),
    plus the largest |bias|."""
    sums = abs(centred_weights).sum(1)
    return int(x_bound) * int(sums.max()) + int(bias_bound) if len(sums) else int(bias_bound)


@dataclass(frozen=True)
class AccumulatorOverflow:
    """A layer whose accumulator can pass the march's (saturating) accumulator range."""

    layer: str
    input_dtype: str
    fan_in: int
    bound: int
    """The largest |accumulator| its weights and input range allow."""
    bits: int

    def describe(self) -> str:
        """One line for a warning or `hat check`."""
        return (f"{self.layer}: the {self.input_dtype} x int8 accumulator (fan-in {self.fan_in}) can reach "
                f"{self.bound:.3g}, past the {self.bits}-bit accumulator, which saturates there; "
                "keep this layer in int8 or give it fewer inputs")

    def to_dict(self) -> dict:
        """The record as plain JSON values."""
        return asdict(self)


@dataclass(frozen=True)
class BiasSaturation:
    """A layer whose int32 bias does not hold its float bias on some channels."""

    layer: str
    """Dotted module path (or node name) of the conv / linear."""
    channels: int
    """How many output channels saturate."""
    of: int
    """Output channels of the layer."""
    worst_channel: int
    bias: float | None
    """The float bias of the worst channel (None where only the integer model is known)."""
    kept: float
    """What the int32 bias of that channel dequantizes to (the range's end, times the scale)."""

    def describe(self) -> str:
        """One line for a warning or `hat check`."""
        need = "" if self.bias is None else (
            f": bias {self.bias:.6g} needs {abs(self.bias / self.kept) if self.kept else math.inf:.3g}x the range")
        return (f"{self.layer}: int32 bias saturates on {self.channels} of {self.of} channels "
                f"(channel {self.worst_channel}{need}, kept as {self.kept:.6g}); the weight scale of those "
                "channels is tiny (a BatchNorm gamma near 0?): retrain or prune them")

    def to_dict(self) -> dict:
        """The record as plain JSON values."""
        return asdict(self)
