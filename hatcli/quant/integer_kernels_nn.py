"""Integer kernels of the `int_infer` program for the ops of attention blocks and norms: matmul of
two activations, softmax, LayerNorm, and the add of a quantized tensor and a float constant (a
relative position bias, an attention mask).

Each kernel is a fixed sequence of exact integer operations and correctly rounded float32
operations (IEEE `*`, `/`, `+`, `sqrt`, and int -> float32 conversions), so that the compiled
artifact, which runs the same sequence as ONNX ops (`hatcli.deploy.attention_lowering`), returns
the same integers on any CPU:

- matmul: the exact sum ``Σ (q_a - z_a)(q_b - z_b)`` (float32 while every partial sum stays below
  2**24, else float64), one cast to float32, times the float32 ``(s_a s_b) / s_y``, rounded half to
  even;
- softmax: ``d = q - max(q)`` (integers), ``e = T[d]`` with the int32 table
  ``T[d] = round(exp(s_x d) * SOFTMAX_ONE)`` (`softmax_table`), the exact integer sum ``S``, then
  ``round((float32(e) / float32(S)) / s_y)``;
- LayerNorm over the last dimension (C values): ``n = C x - Σx`` and ``v = C Σx² - (Σx)²`` exact in
  int64 (``x = q - z``), then ``round(n / sqrt(v + eps C² / s_x²) * (γ / s_y) + β / s_y)`` in float32;
- add of a float tensor ``c``: ``round((q_a - z_a) (s_a / s_y) + c / s_y)``.
"""

from __future__ import annotations

import torch

from hatcli.quant.integer_kernels import EXACT_FLOAT32_LIMIT, _exact_cuda_math, round_half_even

SOFTMAX_ONE = 32767
"""The fixed-point one of softmax's exponential table (int16 inside, as the BPU marches state)."""


def _f32(value: float | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32)


def _requantized(values: torch.Tensor, y_zero: int, y_low: int, y_high: int, y_dtype: torch.dtype) -> torch.Tensor:
    return (round_half_even(values).clamp(y_low - y_zero, y_high - y_zero) + y_zero).to(y_dtype)


def int_matmul(q_a: torch.Tensor, a_scale: float, a_zero: int, a_bound: int, q_b: torch.Tensor, b_scale: float,
               b_zero: int, b_bound: int, y_scale: float, y_zero: int, y_qmin: int, y_qmax: int,
               y_dtype: torch.dtype) -> torch.Tensor:
    """Matmul of two quantized tensors (batched as `torch.matmul`): the exact integer sum, cast once
    to float32, times the float32 ``(s_a s_b) / s_y``, rounded half to even. `a_bound` / `b_bound`
    bound ``|q - z|`` of each operand (from its grid), to choose float32 or float64 for the sum."""
    depth = int(q_a.shape[-1])
    exact32 = depth * a_bound * b_bound < EXACT_FLOAT32_LIMIT
    dtype = torch.float32 if exact32 else torch.float64
    a = (q_a.to(torch.int32) - a_zero).to(dtype)
    b = (q_b.to(torch.int32) - b_zero).to(dtype)
    with _exact_cuda_math(a.is_cuda):
        acc = torch.matmul(a, b).to(torch.float64).to(torch.float32)
    multiplier = (_f32(a_scale) * _f32(b_scale)) / _f32(y_scale)
    return _requantized(acc * multiplier, y_zero, y_qmin, y_qmax, y_dtype)


def softmax_table(x_scale: float, span: int) -> torch.Tensor:
    """The int32 table of softmax's exponential for differences ``d = q - max(q)`` in
    ``[-span, 0]``: entry ``span + d`` is ``round_half_even(exp(s_x d) * SOFTMAX_ONE)``,
    computed in float64 (the compiler builds the artifact's table with this same function)."""
    d = torch.arange(-span, 1, dtype=torch.float64)
    return torch.round(torch.exp(d * float(_f32(x_scale))) * SOFTMAX_ONE).to(torch.int32)


def int_softmax(q_x: torch.Tensor, dim: int, table: torch.Tensor, span: int, y_scale: float, y_zero: int,
                y_qmin: int, y_qmax: int, y_dtype: torch.dtype) -> torch.Tensor:
    """Softmax of a quantized tensor along `dim` with the table of `softmax_table` (see the module)."""
    x = q_x.to(torch.int32)
    d = x - x.amax(dim=dim, keepdim=True)
    e = table.to(x.device)[(d + span).to(torch.int64)]
    total = e.sum(dim=dim, keepdim=True, dtype=torch.int32)
    ratio = e.to(torch.float32) / total.to(torch.float32)
    return _requantized(ratio / _f32(y_scale), y_zero, y_qmin, y_qmax, y_dtype)


def layer_norm_epsilon(eps: float, channels: int, x_scale: float) -> float:
    """``eps C² / s_x²`` in float32: LayerNorm's epsilon on the integer variance ``v``."""
    return float(_f32(float(eps) * channels * channels / (float(_f32(x_scale)) ** 2)))


def int_layer_norm(q_x: torch.Tensor, x_zero: int, epsilon: float, gain: torch.Tensor, offset: torch.Tensor,
                   y_zero: int, y_qmin: int, y_qmax: int, y_dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm of a quantized tensor over its last dimension (see the module): `epsilon` from
    `layer_norm_epsilon`, `gain` the float32 ``γ / s_y`` and `offset` the float32 ``β / s_y``."""
    x = q_x.to(torch.int64) - x_zero
    channels = int(x.shape[-1])
    first = x.sum(dim=-1, keepdim=True)
    second = (x * x).sum(dim=-1, keepdim=True)
    centred = (channels * x - first).to(torch.float32)
    variance = (channels * second - first * first).to(torch.float32)
    normalized = centred / torch.sqrt(variance + _f32(epsilon))
    values = normalized * gain.to(torch.float32).to(x.device) + offset.to(torch.float32).to(x.device)
    return _requantized(values, y_zero, y_qmin, y_qmax, y_dtype)


def int_add_float(q_a: torch.Tensor, a_scale: float, a_zero: int, other: torch.Tensor, y_scale: float, y_zero: int,
                  y_low: int, y_high: int, y_dtype: torch.dtype, subtract: bool = False) -> torch.Tensor:
    """A quantized tensor plus (or minus) a float tensor: ``(q_a - z_a) (s_a / s_y) ± c / s_y`` in
    float32, rounded half to even, held in [y_low, y_high] (narrowed by a fused clamp)."""
    y = _f32(y_scale)
    a = (q_a.to(torch.int32) - a_zero).to(torch.float32) * (_f32(a_scale) / y)
    c = other.to(torch.float32) / y
    return _requantized(a - c if subtract else a + c, y_zero, y_low, y_high, y_dtype)


def grid_bound(qmin: int, qmax: int, zero: int) -> int:
    """The largest ``|q - z|`` on a grid."""
    return max(abs(qmin - zero), abs(qmax - zero))


__all__ = ["SOFTMAX_ONE", "grid_bound", "int_add_float", "int_layer_norm", "int_matmul", "int_softmax",
           "layer_norm_epsilon", "softmax_table"]
