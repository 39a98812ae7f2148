"""Bilinear resizing as two matrices of fixed-point weights, shared by the integer program and the
compiler (torch-free), so that any factor, size and `align_corners` is exact on both sides.

Each output row (column) mixes two input rows (columns) with weights ``1 - l`` and ``l``, where
``l`` is PyTorch's source-coordinate fraction rounded to a multiple of 1/256 (as an accelerator's
fixed-point interpolation does). With dyadic weights every product and sum of 8- or 16-bit
integers is exact in float64, so the result does not depend on the order of the arithmetic:
``Y = A_h @ (q - z) @ A_w^T``, then one cast to float32 and a round half to even.
"""

from __future__ import annotations

import math

import numpy as np

WEIGHT_STEPS = 256
"""Interpolation weights are multiples of 1 / WEIGHT_STEPS."""


def linear_weights(in_size: int, out_size: int, align_corners: bool, scale: float | None = None) -> np.ndarray:
    """The (out_size, in_size) float64 matrix of one axis of a bilinear resize. `scale` is the
    requested factor (PyTorch's `scale_factor`, ONNX's `scales`); None: out_size / in_size."""
    matrix = np.zeros((out_size, in_size), np.float64)
    for index in range(out_size):
        if align_corners:
            source = index * (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        else:
            ratio = 1.0 / scale if scale else in_size / out_size
            source = max(ratio * (index + 0.5) - 0.5, 0.0)
        low = min(int(math.floor(source)), in_size - 1)
        high = min(low + 1, in_size - 1)
        fraction = round((source - low) * WEIGHT_STEPS) / WEIGHT_STEPS
        matrix[index, low] += 1.0 - fraction
        matrix[index, high] += fraction
    return matrix
