"""Learned activation scales for QAT (`qat.activation_scales = "learned"`): LSQ fake quantization.

`LsqFakeQuantize` is the activation fake quant of a prepared graph whose per-tensor scale is a
trainable parameter, as in LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020):

    x_q = clamp(round(x / s) + z, qmin, qmax),   y = (x_q - z) * s

with the straight-through estimator for the rounding (dy/dx = 1 inside the grid, 0 where the
value saturates) and the LSQ gradient of the scale, per element

    dy/ds = round(x / s) - x / s     inside the grid (where round(x / s) + z is in [qmin, qmax]),
            qmin - z / qmax - z      below / above it,

multiplied by the gradient scale g = 1 / sqrt(N * qmax), where N is the number of features of
one sample (the tensor's size without its batch dimension: the paper's N_F) and qmax the top of
the grid (127 for int8, 255 for the unsigned grid after ReLU, 32767 for int16). These are the
fused kernels of PyTorch's `torch._fake_quantize_learnable_per_tensor_affine` (also what torchao's
`LearnableFakeQuantize` uses; on CPU it was faster than a custom autograd function that computes
the scale gradient as two dot products over a recomputed output); its forward is the frozen
`FakeQuantize`'s kernel, so at equal scales the learned and the frozen graph compute bit-for-bit
the same outputs. It also computes a zero-point gradient, which is dropped.

- **Zero point**: fixed (the `zero_point` buffer; 0 on every grid `MarchQuantizer` builds), never learned.
- **Positive scale**: the scale used is `max(scale, EPS)`, applied with a straight-through
  gradient (the parameter keeps receiving its gradient even when it is below EPS, so it can
  come back); `calculate_qparams` clamps the same way. The parameter itself is the scale, not
  its logarithm, so the checkpoint's `scale` entry keeps its meaning.
- **Calibration**: while its observer is on (`set_mode(..., "calibrate")`) the module is an
  ordinary calibrating fake quant: the observer records the range and the scale parameter is
  overwritten with the observer's scale after every batch. So the QAT stage starts from the
  calibrated scale.
- **Checkpoints**: the state dict has exactly the keys of torchao's `FakeQuantize` (`scale`,
  `zero_point`, the flags and the observer's state), so a calibration checkpoint written with
  frozen scales loads into a graph with learned ones and the other way round.
- **Conversion**: with the observer off (train / eval), `calculate_qparams()` returns the learned
  scale, which is what `convert_pt2e` bakes into the integer program (and what int32 bias scales
  are derived from).
- **Optimizer**: the scale is an ordinary parameter; `no_weight_decay = True` tells
  `hatcli.engine.schedule.param_groups` to keep it out of weight decay. Under DDP its gradient is
  averaged like any other.
"""

from __future__ import annotations

import math

import torch
from torchao.quantization.pt2e import FakeQuantize, MinMaxObserver

EPS = float(torch.finfo(torch.float32).eps)
"""Smallest scale used (the observers' own lower bound)."""


def lsq_grad_scale(x: torch.Tensor, quant_max: int) -> float:
    """LSQ's gradient scale g = 1 / sqrt(N * quant_max), N the features of one sample of `x`.

    The first dimension is the batch (the prepared graphs have a free batch dimension); a 0-d or
    1-d tensor counts as one sample.
    """
    features = x.numel() // x.shape[0] if x.dim() > 1 and x.shape[0] > 0 else x.numel()
    return 1.0 / math.sqrt(max(1, features) * max(1, quant_max))


class LsqFakeQuantize(FakeQuantize):
    """Per-tensor fake quant with a learned scale (LSQ); an observer while calibrating.

    Built like torchao's `FakeQuantize` (`observer`, `quant_min`, `quant_max`, the observer's
    keyword arguments: dtype, qscheme, ...), and only per tensor. See the module docstring.
    """

    no_weight_decay = True
    """Read by `hatcli.engine.schedule.param_groups`: this module's parameters get no weight decay."""

    def __init__(self, observer: type = MinMaxObserver, quant_min: int | None = None,
                 quant_max: int | None = None, **observer_kwargs: object) -> None:
        super().__init__(observer=observer, quant_min=quant_min, quant_max=quant_max, **observer_kwargs)
        if self.is_per_channel:
            raise ValueError("LsqFakeQuantize learns one scale per tensor; use it for activations only")
        initial = self.scale.detach().clone()
        del self._buffers["scale"]
        self.scale = torch.nn.Parameter(initial)

    @property
    def learned_scale(self) -> torch.Tensor:
        """The scale the fake quant uses now: the parameter clamped to at least `EPS` (detached)."""
        return self.scale.detach().clamp(min=EPS)

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The observer's scale and zero point while it is on (calibration), else the learned scale
        and the fixed zero point: what `convert_pt2e` writes into the integer program."""
        if int(self.observer_enabled[0]) == 1:
            return self.activation_post_process.calculate_qparams()
        return self.learned_scale.clone(), self.zero_point.detach().clone()

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Observe (calibration: the scale follows the observer) and / or fake-quantize `X`."""
        if int(self.observer_enabled[0]) == 1:
            self.activation_post_process(X.detach())
            scale, zero_point = self.activation_post_process.calculate_qparams()
            with torch.no_grad():
                self.scale.copy_(scale.to(self.scale.device, self.scale.dtype).reshape(self.scale.shape))
                self.zero_point.copy_(zero_point.to(self.zero_point.device).reshape(self.zero_point.shape))
        if int(self.fake_quant_enabled[0]) == 1:
            raw = self.scale
            scale = raw + (raw.clamp(min=EPS) - raw).detach()  # value clamped, gradient straight through
            X = torch._fake_quantize_learnable_per_tensor_affine(
                X, scale, self.zero_point.to(scale.dtype), self.quant_min, self.quant_max,
                lsq_grad_scale(X, self.quant_max))
        return X

    def extra_repr(self) -> str:
        """Flags, grid and the current (learned) scale."""
        return (f"fake_quant_enabled={int(self.fake_quant_enabled[0])}, "
                f"observer_enabled={int(self.observer_enabled[0])}, quant_min={self.quant_min}, "
                f"quant_max={self.quant_max}, dtype={self.dtype}, qscheme={self.qscheme}, "
                f"scale={float(self.learned_scale.reshape(-1)[0])}, zero_point={int(self.zero_point.reshape(-1)[0])}")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # FakeQuantize stores the attribute itself; keep the state dict free of Parameters
        destination[prefix + "scale"] = self.scale if keep_vars else self.scale.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        # FakeQuantize resizes `scale` in place, which a parameter that requires grad refuses;
        # per tensor the shapes agree anyway, so only differing shapes are replaced.
        with torch.no_grad():
            scale = state_dict.get(prefix + "scale")
            if isinstance(scale, torch.Tensor) and scale.shape != self.scale.shape:
                self.scale.data = torch.empty(scale.shape, dtype=self.scale.dtype, device=self.scale.device)
            zero_point = state_dict.get(prefix + "zero_point")
            if isinstance(zero_point, torch.Tensor) and zero_point.shape != self.zero_point.shape:
                self.zero_point.resize_(zero_point.shape)
        torch.nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                              missing_keys, unexpected_keys, error_msgs)


def learned_scale_modules(module: torch.nn.Module) -> list[tuple[str, LsqFakeQuantize]]:
    """Every `LsqFakeQuantize` in `module`, named, in module order (each instance once)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, LsqFakeQuantize)]
