"""The windows of a 2-D average pool as PyTorch defines them, shared by the integer program and the
compiler (torch-free): the output size and the divisor of every output position.

An 8-bit average pool is computed as the exact integer sum of its window, times the float32
multiplier ``s_x / (s_y * divisor)``, rounded half to even. The divisor is the window's size
counting padding (`count_include_pad`) or only the input's pixels, and with `ceil_mode` the last
windows are cut at the padded edge; ONNX Runtime's float AveragePool does not always agree with
PyTorch there, so neither side uses it.
"""

from __future__ import annotations

import math

import numpy as np


def _output_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    span = size + 2 * pad - kernel
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1  # the last window would start inside the right padding
    return out


def _divisors_1d(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool,
                 count_include_pad: bool) -> np.ndarray:
    divisors = []
    for index in range(_output_size(size, kernel, stride, pad, ceil_mode)):
        start = index * stride - pad
        end = min(start + kernel, size + pad)
        padded = end - start
        divisors.append(padded if count_include_pad else min(end, size) - max(start, 0))
    return np.asarray(divisors, dtype=np.int64)


def avg_pool_divisors(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                      padding: tuple[int, int], ceil_mode: bool, count_include_pad: bool) -> np.ndarray:
    """The divisor of every output position (an int64 array of the output's H x W)."""
    rows = _divisors_1d(size[0], kernel[0], stride[0], padding[0], ceil_mode, count_include_pad)
    cols = _divisors_1d(size[1], kernel[1], stride[1], padding[1], ceil_mode, count_include_pad)
    return np.outer(rows, cols)  # a window is a rectangle: its size is the product of its sides


def output_size(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], ceil_mode: bool) -> tuple[int, int]:
    """The pool's output H, W."""
    return (_output_size(size[0], kernel[0], stride[0], padding[0], ceil_mode),
            _output_size(size[1], kernel[1], stride[1], padding[1], ceil_mode))


def pool_multipliers(x_scale: float, y_scale: float, divisors: np.ndarray) -> np.ndarray:
    """The float32 requantization multiplier of each output position: ``s_x / (s_y * divisor)``,
    each step in float32 (as `int_global_avg_pool` computes it)."""
    return (np.float32(x_scale) / (np.float32(y_scale) * divisors.astype(np.float32))).astype(np.float32)
