"""The int32 bias of a conv / linear: its range, and which layers' biases saturate it; and the
worst case of a layer's accumulator (an int16 layer's can pass 2^31).

A bias is quantized with the scale ``s_x * s_w`` of its channel. When the weight scale is tiny
(BatchNorm folding of a channel with gamma near 0) a modest bias needs more than 2^31 steps; it
is then held at the range's end. The range is not the full int32: its ends are float32 numbers
(the quantize op clamps in float32, and 2^31 - 1 rounds to 2^31, which wraps to -2^31 when cast),
and they leave room for the largest accumulator an 8-bit layer can reach, so that accumulator
plus bias never leaves int32 and no kernel can wrap it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.fx import GraphModule, Node

INT32_MAX = 2**31 - 1
EIGHT_BIT_PRODUCT = 255 * 127
"""The largest |x * w| of an 8-bit layer: an unsigned activation times an int8 weight."""
CONV_OPS = ("conv1d", "conv2d", "linear")


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


def _fan_in(weight: Node | torch.Tensor) -> int | None:
    value = weight.meta.get("val") if isinstance(weight, Node) else weight
    shape = getattr(value, "shape", None)
    return None if shape is None or len(shape) < 2 else int(math.prod(shape[1:]))


def weight_fan_in(weight: Node) -> int:
    """The number of products each output of the layer with weight node `weight` sums (8-bit
    worst case when the shape is unknown: a 3x3x1024 conv)."""
    return _fan_in(weight) or 3 * 3 * 1024


def _module(gm: GraphModule, node: object) -> torch.nn.Module | None:
    if isinstance(node, Node) and node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def _constant(gm: GraphModule, node: object) -> torch.Tensor | None:
    if isinstance(node, Node) and node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    return None


def saturated_biases(prepared: GraphModule, layer_name: Callable[[Node], str] = lambda node: node.name,
                     ) -> list[BiasSaturation]:
    """Every conv / linear of a calibrated or trained prepared graph whose float bias, quantized
    with its derived scale, leaves the int32 range it is given (`bias_limit`); `layer_name` names
    a layer by its node."""
    found = []
    for node in prepared.graph.nodes:
        name = node.target.name() if isinstance(node.target, torch._ops.OpOverload) else ""
        if node.op != "call_function" or name.split("::")[-1].split(".")[0] not in CONV_OPS or len(node.args) < 3:
            continue
        bias_fq = _module(prepared, node.args[2])
        bias = _constant(prepared, node.args[2].args[0]) if bias_fq is not None and node.args[2].args else None
        if bias_fq is None or bias is None or not hasattr(bias_fq, "calculate_qparams"):
            continue
        scale, _ = bias_fq.calculate_qparams()
        scale = scale.detach().to(torch.float32).reshape(-1).expand(bias.numel())
        bias = bias.detach().to(torch.float32).reshape(-1)
        steps = bias / scale
        limit = float(getattr(bias_fq, "quant_max", None) or bias_limit(weight_fan_in(node.args[1])))
        over = steps.abs() > limit
        if not bool(over.any()):
            continue
        worst = int(torch.argmax(steps.abs()))
        kept = math.copysign(limit, float(steps[worst])) * float(scale[worst])
        found.append(BiasSaturation(layer_name(node), int(over.sum()), bias.numel(), worst,
                                    float(bias[worst]), kept))
    return found
