"""The integer arithmetic of each quantized op of the `int_infer` program: exact int32
accumulation, float32 requantization rounded half to even, 256-entry tables (the formulas are
listed in `hatcli.quant.integer`, which rewrites the reference program to call these)."""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from hatcli.quant.pool_windows import avg_pool_divisors, pool_multipliers
from hatcli.quant.resize_weights import linear_weights

EXACT_FLOAT32_LIMIT = 2**24
"""Integer sums below this are exact in float32."""


def _f32(value: float | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32)


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties to even (what the runtime's float->int conversion does)."""
    return torch.round(x)


def quantize_input(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Quantize a float tensor as the runtime does: divide by the scale (float32), round half to
    even, clamp, add the zero point."""
    q = round_half_even(x.to(torch.float32) / _f32(scale))
    return (q.clamp(qmin - zero_point, qmax - zero_point) + zero_point).to(dtype)


def _accumulate(op: str, x: torch.Tensor, w: torch.Tensor, x_bound: int, conv_args: tuple) -> torch.Tensor:
    """Exact integer accumulation of an int conv/linear, returned as float64 integer values."""
    fan_in = w[0].numel()
    w_bound = int(w.abs().max()) if w.numel() else 0
    exact32 = fan_in * x_bound * w_bound < EXACT_FLOAT32_LIMIT
    dtype = torch.float32 if exact32 else torch.float64
    xf, wf = x.to(dtype), w.to(dtype)
    with _exact_cuda_math(x.is_cuda):
        if op == "conv2d":
            acc = torch.nn.functional.conv2d(xf, wf, None, *conv_args)
        elif op == "conv1d":
            acc = torch.nn.functional.conv1d(xf, wf, None, *conv_args)
        else:
            acc = torch.nn.functional.linear(xf, wf)
    return acc.to(torch.float64)


@contextlib.contextmanager
def _exact_cuda_math(on_cuda: bool):
    """TF32 rounds int16 operands; keep full float32 products for the duration of one op."""
    if not on_cuda:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _channel_view(values: torch.Tensor, op: str) -> torch.Tensor:
    return values.reshape({"conv2d": (1, -1, 1, 1), "conv1d": (1, -1, 1)}.get(op, (1, -1)))


def int_weighted(op: str, q_x: torch.Tensor, x_scale: float, x_zero: int, x_qmin: int, x_qmax: int,
                 q_w: torch.Tensor, w_scale: torch.Tensor, q_bias: torch.Tensor | None,
                 conv_args: tuple, y_scale: float | None, y_zero: int, y_low: int, y_high: int,
                 y_dtype: torch.dtype | None, float_clamp: tuple[float, float] | None,
                 accumulator_bits: int = 32) -> torch.Tensor:
    """One quantized conv2d / conv1d / linear in integer arithmetic (see `hatcli.quant.integer`).

    The exact accumulator (bias included) saturates at `accumulator_bits`. Returns the
    requantized output (dtype `y_dtype`) held in [y_low, y_high] (the output range, narrowed by a
    fused clamp), or, when `y_scale` is None (the op is not requantized: a graph output, or a
    float op follows), the dequantized accumulator in float32, clamped to `float_clamp` where a
    clamp is fused.
    """
    x = q_x.to(torch.int32) - x_zero
    x_bound = max(abs(x_qmin - x_zero), abs(x_qmax - x_zero))
    acc = _accumulate(op, x, q_w.to(torch.int32), x_bound, conv_args)
    if q_bias is not None:
        acc = acc + _channel_view(q_bias.to(torch.float64), op)
    limit = 2.0 ** (accumulator_bits - 1)
    acc = acc.clamp(-limit, limit - 1)  # the accumulator saturates (exact in float64 up to 2^53)
    acc32 = acc.to(torch.float32)  # int32 -> float32, round to nearest even, as the runtime does
    product = _f32(x_scale) * w_scale.to(torch.float32)
    if y_scale is None:
        out = acc32 * _channel_view(product, op)
        return out if float_clamp is None else out.clamp(*float_clamp)
    multiplier = _channel_view(product / _f32(y_scale), op)
    q = round_half_even(acc32 * multiplier).clamp(y_low - y_zero, y_high - y_zero) + y_zero
    return q.to(y_dtype)


def int_add(q_a: torch.Tensor, a_scale: float, a_zero: int, q_b: torch.Tensor, b_scale: float, b_zero: int,
            y_scale: float, y_zero: int, y_low: int, y_high: int, y_dtype: torch.dtype,
            subtract: bool = False) -> torch.Tensor:
    """Elementwise add (or subtract) of two quantized tensors, one float32 operation at a time:
    ``(q_a - z_a) * (s_a / s_y) ± (q_b - z_b) * (s_b / s_y)``, rounded half to even and held in
    [y_low, y_high] (the output range, narrowed by a fused clamp); the compiled artifact runs the
    same sequence, see `hatcli.deploy.lowering.lower_quantized_binary`."""
    y = _f32(y_scale)
    a = (q_a.to(torch.int32) - a_zero).to(torch.float32) * (_f32(a_scale) / y)
    b = (q_b.to(torch.int32) - b_zero).to(torch.float32) * (_f32(b_scale) / y)
    total = a - b if subtract else a + b
    return (round_half_even(total).clamp(y_low - y_zero, y_high - y_zero) + y_zero).to(y_dtype)


def int_mul(q_a: torch.Tensor, a_scale: float, a_zero: int, q_b: torch.Tensor, b_scale: float, b_zero: int,
            y_scale: float, y_zero: int, y_qmin: int, y_qmax: int, y_dtype: torch.dtype) -> torch.Tensor:
    """Elementwise product of two 8- or 16-bit tensors: the exact integer product (within int32)
    ``(q_a - z_a)(q_b - z_b)``, times the float32 multiplier ``(s_a s_b) / s_y``, rounded half to
    even (the compiled artifact runs the same ops)."""
    product = ((q_a.to(torch.int32) - a_zero) * (q_b.to(torch.int32) - b_zero)).to(torch.float32)
    multiplier = (_f32(a_scale) * _f32(b_scale)) / _f32(y_scale)
    q = round_half_even(product * multiplier)
    return (q.clamp(y_qmin - y_zero, y_qmax - y_zero) + y_zero).to(y_dtype)


def lookup_table(fn, scale: float, zero: int, qmin: int, qmax: int, y_scale: float, y_zero: int,
                 y_qmin: int, y_qmax: int, y_dtype: torch.dtype) -> torch.Tensor:
    """The table of an elementwise function of one 8-bit tensor: entry ``i`` is the quantized
    ``fn(dequantize(qmin + i))``. The compiler builds the artifact's table with this same function
    (`hatcli.deploy.table_lowering.lower_lookup_tables`), so both hold identical entries."""
    values = torch.arange(qmin, qmax + 1, dtype=torch.int32)
    x = (values - zero).to(torch.float32) * _f32(scale)
    with torch.no_grad():
        y = fn(x).to(torch.float32)
    return quantize_input(y, y_scale, y_zero, y_qmin, y_qmax, y_dtype)


def int_lookup(q_x: torch.Tensor, table: torch.Tensor, qmin: int) -> torch.Tensor:
    """Apply a lookup table built by `lookup_table` to a quantized tensor."""
    return table.to(q_x.device)[q_x.to(torch.int64) - qmin]


def int_resample(q_x: torch.Tensor, zero: int, qmin: int, qmax: int, dtype: torch.dtype,
                 out_size: tuple[int, int] | None, align_corners: bool,
                 scales: tuple[float, float] | None) -> torch.Tensor:
    """A bilinear resize that keeps the scale: ``rows @ (q - z) @ cols^T`` with the fixed-point
    weight matrices of `hatcli.quant.resize_weights` (exact in float64), cast to float32 once and
    rounded half to even (the compiler lowers the artifact's Resize to the same matrices).
    `out_size` or `scales` as `upsample_bilinear2d` takes them."""
    size = (int(q_x.shape[-2]), int(q_x.shape[-1]))
    factors = scales or (None, None)
    out = out_size or tuple(int(math.floor(n * f)) for n, f in zip(size, factors))
    rows, cols = (torch.from_numpy(_axis_weights(n, int(o), align_corners, f if out_size is None else None))
                  for n, o, f in zip(size, out, factors))
    centred = q_x.to(torch.float64) - zero
    y = torch.matmul(torch.matmul(rows.to(centred.device), centred), cols.to(centred.device).T).to(torch.float32)
    return (round_half_even(y).clamp(qmin - zero, qmax - zero) + zero).to(dtype)


@functools.lru_cache(maxsize=64)
def _pool_multipliers(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                      padding: tuple[int, int], ceil_mode: bool, count_include_pad: bool,
                      x_scale: float, y_scale: float) -> torch.Tensor:
    """The per-position multipliers of one pool on one map size, built once, not on every batch."""
    divisors = avg_pool_divisors(size, kernel, stride, padding, ceil_mode, count_include_pad)
    return torch.from_numpy(pool_multipliers(x_scale, y_scale, divisors))


@functools.lru_cache(maxsize=64)
def _axis_weights(in_size: int, out_size: int, align_corners: bool, scale: float | None):
    return linear_weights(in_size, out_size, align_corners, scale)


def int_global_avg_pool(q_x: torch.Tensor, x_scale: float, x_zero: int, y_scale: float, y_zero: int,
                        y_qmin: int, y_qmax: int, y_dtype: torch.dtype, keepdim: bool) -> torch.Tensor:
    """Global average pooling over H, W: exact integer sum, requantized with s_x / (s_y * N)."""
    n = q_x.shape[-1] * q_x.shape[-2]
    acc = (q_x.to(torch.float64) - x_zero).sum(dim=(-2, -1), keepdim=keepdim).to(torch.float32)
    multiplier = _f32(x_scale) / (_f32(y_scale) * _f32(float(n)))
    q = round_half_even(acc * multiplier).clamp(y_qmin - y_zero, y_qmax - y_zero) + y_zero
    return q.to(y_dtype)


def int_avg_pool(q_x: torch.Tensor, x_scale: float, x_zero: int, y_scale: float, y_zero: int,
                 y_qmin: int, y_qmax: int, y_dtype: torch.dtype, kernel: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int], ceil_mode: bool,
                 count_include_pad: bool) -> torch.Tensor:
    """A 2-D average pool: the exact integer sum of each window (padding counts as 0), times the
    float32 ``s_x / (s_y * divisor)`` of its position (`hatcli.quant.pool_windows`), rounded half
    to even."""
    size = (int(q_x.shape[-2]), int(q_x.shape[-1]))
    centred = q_x.to(torch.float64) - x_zero
    acc = torch.nn.functional.avg_pool2d(centred, kernel, stride, padding, ceil_mode, True, 1).to(torch.float32)
    multiplier = _pool_multipliers(size, tuple(kernel), tuple(stride), tuple(padding), ceil_mode, count_include_pad,
                                   x_scale, y_scale).to(q_x.device)
    q = round_half_even(acc * multiplier).clamp(y_qmin - y_zero, y_qmax - y_zero) + y_zero
    return q.to(y_dtype)


# -- graph rewriting ----------------------------------------------------------------------------
