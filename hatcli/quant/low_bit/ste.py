"""Straight-through estimators: the forward is the quantizer's, the backward an approximation.

- `round_ste(x)`: rounds half to even, gradient 1 (Bengio et al. 2013);
- `sign_ste(x, clip)`: `torch.sign` (0 stays 0, as in the integer program), gradient 1 where
  |x| <= clip and 0 elsewhere (the clipped STE of BinaryNet / XNOR-Net); `clip=None`: gradient 1.
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """`torch.round(x)` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


class _ClippedSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.clip = clip
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


def sign_ste(x: torch.Tensor, clip: float | None = 1.0) -> torch.Tensor:
    """`torch.sign(x)` forward; backward 1 where |x| <= `clip` (everywhere when `clip` is None)."""
    if clip is None:
        return x + (torch.sign(x) - x).detach()
    return _ClippedSign.apply(x, float(clip))


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where x >= 0, else -1 (for weights, where a zero would waste a level)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
