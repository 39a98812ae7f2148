"""LQ-Net (Zhang et al., "LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep
Neural Networks", ECCV 2018): learned, non-uniform levels.

A K-bit quantizer has a basis v in R^K; its 2**K levels are the sums B . v over the codes
B in {-1, +1}^K (weights) or {0, 1}^K (activations after a ReLU). A value is replaced by its
nearest level (straight-through gradient). In training, every forward re-fits the basis to the
current values (a forward with gradients enabled) by quantization error minimisation (QEM: the least-squares v for the codes just
chosen, accumulated as a moving average with momentum `momentum`). Weights have a basis per output
channel, activations one per tensor. The basis starts as a uniform grid (v_k = 2**(k-1) * step)
sized from calibration.

The levels are not a uniform grid, so no int8 kernel computes them: these quantizers train and
evaluate in fake quantization only (`integer = False`), and conversion to an integer program is
refused with the reason.
"""

from __future__ import annotations

import itertools

import torch

from hatcli.errors import UsageError
from hatcli.quant.low_bit.fake_quant import EPS, GridFakeQuantize
from hatcli.quant.low_bit.schemes import LQNET_NOT_INTEGER



def _codes(bits: int, signed: bool) -> torch.Tensor:
    """Every code B as rows: [2**K, K] of +-1 (signed) or 0/1."""
    values = (-1.0, 1.0) if signed else (0.0, 1.0)
    return torch.tensor(list(itertools.product(values, repeat=bits)))


def _nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of each row of `x` [R, N] among `levels` [R, L] (any order)."""
    ordered, order = levels.sort(dim=1)
    thresholds = (ordered[:, 1:] + ordered[:, :-1]) / 2
    position = torch.searchsorted(thresholds.contiguous(), x.contiguous())
    return order.gather(1, position)


class LqFakeQuantize(GridFakeQuantize):
    """Learned levels B . v; per output channel (`per_channel`, weights) or per tensor."""

    integer = False

    def __init__(self, bits: int, signed: bool, per_channel: bool = False, momentum: float = 0.9) -> None:
        top = 2 ** bits - 1
        super().__init__(-top if signed else 0, top, bits, per_channel=per_channel)
        self.signed, self.momentum = signed, momentum
        self.register_buffer("codes", _codes(bits, signed))
        self.register_buffer("basis", torch.ones(1, bits))
        """[rows, K]: one basis per output channel (weights) or one row (activations)."""

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)

    def observe(self, x: torch.Tensor) -> None:
        """A uniform starting basis: levels spread over the observed range."""
        rows = self._rows(x)
        top = rows.abs().amax(1).clamp(min=EPS)
        steps = 2.0 ** torch.arange(self.bits, dtype=torch.float32, device=x.device)
        self.basis = (top.float() / steps.sum())[:, None] * steps[None, :]  # top level = the range

    def levels(self) -> torch.Tensor:
        """[rows, 2**K] levels of each basis."""
        return self.basis @ self.codes.T

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest level (STE); in training, a QEM step on the basis first."""
        rows = self._rows(x)
        training = torch.is_grad_enabled()  # a training step (evaluation runs without gradients)
        with torch.no_grad():
            index = _nearest(rows.detach().float(), self.levels())
            if training:
                self._fit_basis(rows.detach().float(), index)
                index = _nearest(rows.detach().float(), self.levels())
            quantized = self.levels().gather(1, index).to(x.dtype).reshape(x.shape)
        return x + (quantized - x).detach()

    def _fit_basis(self, rows: torch.Tensor, index: torch.Tensor) -> None:
        """Least-squares basis for the chosen codes (normal equations per row), averaged in."""
        b = self.codes[index]  # [R, N, K]
        gram = b.transpose(1, 2) @ b + 1e-6 * torch.eye(self.bits, device=rows.device)
        target = (b.transpose(1, 2) @ rows.unsqueeze(-1)).squeeze(-1)
        fitted = torch.linalg.solve(gram, target)
        if not self.signed:
            fitted = fitted.clamp(min=0)
        self.basis = self.momentum * self.basis + (1 - self.momentum) * fitted

    def grid_scale(self) -> torch.Tensor:
        """There is no uniform grid: refuse (see `grid_ready`)."""
        self.grid_ready()
        raise AssertionError("unreachable")

    def grid_ready(self) -> None:
        """LQ-Net has no integer grid: a clear error instead of a wrong integer program."""
        raise UsageError(f"scheme `{self.scheme or 'lqnet'}`: {LQNET_NOT_INTEGER}; evaluate it with "
                         f"`hat eval RECIPE --stage qat`")
