"""Integer ranges of b-bit grids, all with zero point 0 (torch-free).

Every uniform b-bit grid with b <= 8 is a subset of an 8-bit one, so the int8 kernels of the
integer program and of the compiled artifact compute it exactly: only the range narrows.
"""

from __future__ import annotations


def unsigned_range(bits: int) -> tuple[int, int]:
    """[0, 2**b - 1]: a non-negative activation (after ReLU) at `bits` bits."""
    _check(bits)
    return 0, 2 ** bits - 1


def signed_range(bits: int) -> tuple[int, int]:
    """[-2**(b-1), 2**(b-1) - 1]: two's-complement b bits (LSQ's weight and signed-activation grid)."""
    _check(bits)
    if bits == 1:
        return -1, 0
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def symmetric_range(bits: int) -> tuple[int, int]:
    """[-(2**(b-1) - 1), 2**(b-1) - 1]: symmetric b bits (ternary at 2 bits, {-1, 1} at 1 bit)."""
    _check(bits)
    if bits == 1:
        return -1, 1
    top = 2 ** (bits - 1) - 1
    return -top, top


def _check(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"a grid of {bits} bits is outside 1..8")
