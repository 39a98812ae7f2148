"""The int32 bias of a low-bit layer, fake-quantized in QAT as the integer program rounds it.

The integer program adds the bias in accumulator units: `round(b / (s_x * s_w))`. At 8 bits that
unit is tiny and QAT can ignore the rounding (torchao's derived bias observer passes the bias
through); at 2 bits `s_x * s_w` is a sizeable fraction of the output, and the rounded bias alone
moved a small network's logits by ~1.7 % of their size against the fake-quant graph. So the bias
observer of every layer with a scheme quantizer is switched to `LowBitBiasFakeQuantize`, which
rounds the bias to that unit in QAT and evaluation (straight-through gradient), and the QAT graph
computes what is deployed. March (int8) layers keep torchao's pass-through observer, unchanged.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule
from torchao.quantization.pt2e import DerivedObserverOrFakeQuantize

from hatcli.quant.low_bit.fake_quant import GridFakeQuantize


class LowBitBiasFakeQuantize(DerivedObserverOrFakeQuantize):
    """torchao's derived int32 bias quantizer, rounding the bias to `s_x * s_w` outside calibration."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The bias on its int32 grid (straight-through), or unchanged while calibrating."""
        quantizers = [q for q in self.obs_or_fqs if isinstance(q, GridFakeQuantize)]
        if not quantizers or any(q.calibrating or not bool(q.fake_quant_enabled[0]) or not q.integer
                                 for q in quantizers):
            return x  # calibrating, fake quant off, or no integer grid (LQ-Net): nothing to round to
        scale, _ = self.calculate_qparams()
        scale = scale.to(x.device, x.dtype).reshape(-1)
        codes = torch.clamp(torch.round(x.detach() / scale), self.quant_min, self.quant_max)
        return x + (codes * scale - x).detach()


def quantize_low_bit_biases(prepared: GraphModule) -> int:
    """Switch the bias observers of low-bit layers to `LowBitBiasFakeQuantize`; how many."""
    count = 0
    for module in prepared.modules():
        if type(module) is DerivedObserverOrFakeQuantize and any(
                isinstance(q, GridFakeQuantize) for q in module.obs_or_fqs):
            module.__class__ = LowBitBiasFakeQuantize  # same state, same conversion; only forward differs
            count += 1
    return count
