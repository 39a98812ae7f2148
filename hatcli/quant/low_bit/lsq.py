"""LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020) for weights and activations.

    x_q = clamp(round(x / s), Q_n, Q_p) * s

with a learned step `s` (one per output channel or group of channels for weights, one per tensor
for activations), the straight-through estimator for the rounding and LSQ's gradient scale
g = 1 / sqrt(N * Q_p) on the step (N: weights per step, or features of one sample). Weights use
the two's-complement grid [-2**(b-1), 2**(b-1) - 1]; activations [0, 2**b - 1] after a ReLU, else
the signed grid. Calibration initialises the step to 2 <|x|> / sqrt(Q_p) (the paper's rule;
<|x|> averaged over the calibration batches for activations).

BatchNorm is folded into the convolution before QAT (`hatcli.quant.flow`), so the weight step is
per output channel by default: it absorbs the BatchNorm's per-channel scale.
"""

from __future__ import annotations

import math

import torch

from hatcli.quant.low_bit.fake_quant import EPS, GridFakeQuantize, expand_groups, per_output_channel
from hatcli.quant.low_bit.grids import signed_range, unsigned_range


def _positive(raw: torch.Tensor) -> torch.Tensor:
    """`raw` clamped to at least EPS in value, with its gradient passed straight through."""
    return raw + (raw.clamp(min=EPS) - raw).detach()


class LsqWeightFakeQuantize(GridFakeQuantize):
    """LSQ weight quantizer: a learned step per output channel (`groups` 0), tensor (1) or group."""

    def __init__(self, bits: int, groups: int = 0, grad_scale: float | None = None) -> None:
        qmin, qmax = signed_range(bits)
        super().__init__(qmin, qmax, bits, per_channel=True, groups=groups)
        self.grad_scale = grad_scale
        """A fixed gradient scale instead of LSQ's 1 / sqrt(N * Q_p) (None: LSQ's)."""
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.register_buffer("channels", torch.tensor(1, dtype=torch.int64))

    def observe(self, w: torch.Tensor) -> None:
        """2 <|w|> / sqrt(Q_p) per step."""
        mean_abs = per_output_channel(w.abs(), self.groups).mean(1)
        self.scale.data = (2 * mean_abs / math.sqrt(max(1, self.quant_max))).clamp(min=EPS).float()
        self.channels.fill_(w.shape[0])

    def grid_scale(self) -> torch.Tensor:
        """One step per output channel (per-group steps repeated)."""
        return expand_groups(_positive(self.scale), int(self.channels))

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """LSQ's fused per-channel kernel (STE rounding, the step's LSQ gradient)."""
        scale = self.grid_scale()
        per_step = w.numel() // max(1, self.scale.numel())
        g = self.grad_scale or 1.0 / math.sqrt(per_step * max(1, self.quant_max))
        zero = torch.zeros_like(scale)
        return torch._fake_quantize_learnable_per_channel_affine(w, scale, zero, 0, self.quant_min,
                                                                 self.quant_max, g)


class LsqActivationFakeQuantize(GridFakeQuantize):
    """LSQ activation quantizer: one learned step per tensor, on the unsigned or the signed grid."""

    def __init__(self, bits: int, signed: bool, grad_scale: float | None = None) -> None:
        qmin, qmax = signed_range(bits) if signed else unsigned_range(bits)
        super().__init__(qmin, qmax, bits)
        self.grad_scale = grad_scale
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.register_buffer("abs_sum", torch.zeros(1))
        self.register_buffer("batches", torch.zeros(1))

    def observe(self, x: torch.Tensor) -> None:
        """Average <|x|> over the calibration batches; the step is 2 <|x|> / sqrt(Q_p)."""
        self.abs_sum += x.abs().mean().float()
        self.batches += 1
        mean_abs = self.abs_sum / self.batches
        self.scale.data = (2 * mean_abs / math.sqrt(max(1, self.quant_max))).clamp(min=EPS)

    def grid_scale(self) -> torch.Tensor:
        """The learned step, at least EPS."""
        return _positive(self.scale)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ's fused per-tensor kernel, gradient scale 1 / sqrt(features of one sample * Q_p)."""
        features = x.numel() // x.shape[0] if x.dim() > 1 and x.shape[0] > 0 else x.numel()
        g = self.grad_scale or 1.0 / math.sqrt(max(1, features) * max(1, self.quant_max))
        scale = self.grid_scale()
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, torch.zeros_like(scale),
                                                                self.quant_min, self.quant_max, g)
