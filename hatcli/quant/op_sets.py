"""The aten ops `MarchQuantizer` knows, grouped by the part they play in annotation (weighted,
fused clamp, look-up table, scale-preserving, ...), and the one table of fusable clamps.

A fused clamp (ReLU, ReLU6, hardtanh, clamp, clamp_min) after a conv / linear / add is applied to
the requantized integers: its bounds, quantized on the output grid by `ClampBounds.on_grid`,
clamp the rounded result. The quantizer (which clamps it fuses: `CLAMP_OPS`, `clamp_bounds`), the
integer program (`hatcli.quant.integer`) and the compiler (`hatcli.deploy.kernel_fusion`,
`hatcli.deploy.lowering`, reading the ONNX `Relu` / `Clip` the clamp exports to) all take the
bounds from `hatcli.quant.clamps`, so they cannot disagree on what a clamp is.
"""

from __future__ import annotations

from typing import Any

import torch

from hatcli.quant.clamps import ClampBounds

A = torch.ops.aten


def _ops(*names: str) -> set:
    """aten overloads by `name.overload`, skipping any this torch does not have."""
    found = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(A, packet, None), overload or "default", None)
        if op is not None:
            found.add(op)
    return found


CONV_OPS = _ops("conv2d", "conv1d")
LINEAR_OPS = _ops("linear")
CLAMP_OPS = _ops("relu", "relu_", "relu6", "relu6_", "hardtanh", "hardtanh_", "clamp", "clamp_",
                 "clamp_min", "clamp_min_")
"""ReLU-like clamps: fused into the conv / linear / add before them, otherwise requantized."""
SILU_OPS = _ops("silu", "silu_")
LUT_OPS = SILU_OPS | _ops("sigmoid", "sigmoid_", "tanh", "tanh_", "hardsigmoid", "hardsigmoid_",
                          "hardswish", "hardswish_", "exp", "exp_", "gelu", "gelu_")
"""Look-up-table ops: input shares its producer's scale, output requantized."""
NON_NEGATIVE_LUTS = _ops("sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "exp", "exp_")
ONNX_ACTIVATION = {
    **{op: "Relu" for op in _ops("relu", "relu_")},
    **{op: "Clip" for op in CLAMP_OPS - _ops("relu", "relu_")},
    **{op: "SiLU" for op in SILU_OPS},
    **{op: "Sigmoid" for op in _ops("sigmoid", "sigmoid_")},
    **{op: "Tanh" for op in _ops("tanh", "tanh_")},
    **{op: "HardSigmoid" for op in _ops("hardsigmoid", "hardsigmoid_")},
    **{op: "HardSwish" for op in _ops("hardswish", "hardswish_")},
    **{op: "Gelu" for op in _ops("gelu", "gelu_")},
}
"""What each activation is called in ONNX (the march's `fusible_activations` names)."""
ADD_OPS = _ops("add.Tensor", "add_.Tensor", "sub.Tensor", "sub_.Tensor", "add.Scalar", "sub.Scalar")
MUL_OPS = _ops("mul.Tensor", "mul_.Tensor", "mul.Scalar", "div.Tensor", "div_.Tensor", "div.Scalar")
"""Products: of two activations, or of an activation and a constant (div: by a constant only)."""
DIV_OPS = _ops("div.Tensor", "div_.Tensor", "div.Scalar")
SUB_OPS = _ops("sub.Tensor", "sub_.Tensor", "sub.Scalar")
CAT_OPS = _ops("cat", "concat")
SCALE_PRESERVING_OPS = _ops(
    "adaptive_avg_pool2d", "avg_pool2d", "mean.dim", "max_pool2d", "upsample_nearest2d.vec",
    "upsample_nearest2d", "_upsample_nearest_exact2d.vec", "_upsample_nearest_exact2d",
    "upsample_bilinear2d.vec", "upsample_bilinear2d", "flatten.using_ints", "view", "_unsafe_view",
    "reshape", "permute", "transpose.int", "squeeze", "squeeze.dim", "squeeze.dims", "unsqueeze",
    "slice.Tensor", "clone", "contiguous", "pixel_shuffle", "pixel_unshuffle", "constant_pad_nd", "pad",
    "roll", "select.int", "expand", "narrow", "t",
)
MULTI_OUTPUT_OPS = {**{op: (0,) for op in _ops("max_pool2d_with_indices", "adaptive_max_pool2d")},
                    **{op: None for op in _ops("split.Tensor", "split_with_sizes", "unbind.int",
                                               "chunk")}}
"""Scale-preserving ops returning a tuple: which outputs (None: all) carry the data."""
CONSTANT_PAD_OPS = _ops("constant_pad_nd")
PAD_OPS = CONSTANT_PAD_OPS | _ops("pad")
MATMUL_OPS = _ops("matmul", "bmm")
"""Products of two activations (attention's q k^T and attn v); a constant operand is a linear's job."""
SOFTMAX_OPS = _ops("softmax.int", "_softmax")
LAYER_NORM_OPS = _ops("layer_norm")
CONSTANT_CREATORS = _ops("new_zeros", "new_ones", "new_full", "new_empty", "zeros_like", "ones_like", "full_like",
                         "empty_like")
"""Ops that read only the shape, dtype or device of their input: their result is a constant (a
shifted-window attention mask built with `x.new_zeros`)."""
NEUTRAL_OPS = _ops("dropout", "dropout_")
"""Ops that vanish in eval mode: neither annotated nor reported."""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def clamp_bounds(target: Any, args: tuple, kwargs: dict) -> ClampBounds | None:
    """The bounds of a call of the clamp op `target` (one of CLAMP_OPS) with these arguments;
    None when `target` is not a clamp or a bound is not a plain number."""
    if target not in CLAMP_OPS:
        return None
    name = target.name() if isinstance(target, torch._ops.OpOverload) else str(target)
    rest = list(args[1:])

    def arg(index: int, *keys: str, default: Any = None) -> Any:
        if len(rest) > index:
            return rest[index]
        return next((kwargs[k] for k in keys if k in kwargs), default)

    if "relu6" in name:
        return ClampBounds(0.0, 6.0)
    if "relu" in name:
        return ClampBounds(0.0, None)
    if "hardtanh" in name:
        low, high = arg(0, "min_val", default=-1.0), arg(1, "max_val", default=1.0)
    elif "clamp_min" in name:
        low, high = arg(0, "min"), None
    else:
        low, high = arg(0, "min"), arg(1, "max")
    bounds = ClampBounds(_number(low), _number(high))
    if (low is not None and bounds.low is None) or (high is not None and bounds.high is None):
        return None  # a tensor-valued bound: not a clamp of constants
    return bounds
