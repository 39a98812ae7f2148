"""`GridFakeQuantize`: the base of every low-bit scheme's fake quant, and what hat needs of one.

A scheme's fake quant is a torchao `FakeQuantizeBase` (so the stages switch it like the march's
own: `hatcli.quant.flow.set_mode`) that quantizes onto an integer grid `[quant_min, quant_max]`
with zero point 0 and a positive scale, per tensor (an activation) or per output channel (a
weight: `ch_axis = 0`). Its `forward` returns values on that grid (times the scale) in QAT and
evaluation; while calibrating (observer on, fake quant off) it sees the float values, initialises
its parameters from them (`observe`) and returns its input unchanged.

What conversion relies on:

- `calculate_qparams()` gives the scale (float32, one per channel for weights) and zero point 0
  such that `forward(x) / scale` are integers in `[quant_min, quant_max]` (up to float rounding),
  so `convert_pt2e`'s quantize of the (baked, `hatcli.quant.low_bit.conversion`) weight yields
  exactly the trained codes, and its quantize of an activation the trained grid;
- `explicit_op`: an aten op applied to the input *before* the grid (XNOR's sign), which
  conversion writes into the graph so the integer program and the artifact compute it as a table;
- `integer = False` for levels that are not a uniform grid (LQ-Net): conversion refuses them.

Parameters of these modules get no weight decay (`no_weight_decay`), and a checkpoint whose
parameters have another shape (per-group scales sized at calibration) loads by resizing them.
"""

from __future__ import annotations

import torch
from torchao.quantization.pt2e import FakeQuantizeBase

EPS = float(torch.finfo(torch.float32).eps)
"""Smallest scale used."""


class GridFakeQuantize(FakeQuantizeBase):
    """Fake quant onto `[quant_min, quant_max]` (zero point 0); see the module docstring.

    Subclasses implement `grid_scale()`, `fake_quantize(x)` and, if they learn from calibration,
    `observe(x)`; weights pass `per_channel=True`.
    """

    no_weight_decay = True
    """Read by `hatcli.engine.schedule.param_groups`: scales, clips and bases get no weight decay."""
    integer = True
    """Whether the levels are a uniform grid that int8 kernels compute exactly."""
    explicit_op: object = None
    """An aten op conversion puts before the grid (None: the grid alone)."""
    scheme = ""
    """The scheme's registered name (set by the scheme object; shown by `hat check`)."""

    def __init__(self, quant_min: int, quant_max: int, bits: int, per_channel: bool = False,
                 groups: int = 0) -> None:
        super().__init__()
        self.quant_min, self.quant_max, self.bits = int(quant_min), int(quant_max), int(bits)
        self.dtype = torch.uint8 if quant_min >= 0 else torch.int8
        self.per_channel = per_channel
        self.qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
        self.ch_axis = 0 if per_channel else -1
        self.groups = int(groups)
        """Weights: 0 one scale per output channel, 1 one per tensor, G one per group of channels."""
        self.is_dynamic = False
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    # -- what subclasses provide ---------------------------------------------------------------
    def grid_scale(self) -> torch.Tensor:
        """The scale now: shape [1] per tensor, [C] per channel (positive, detached or not)."""
        raise NotImplementedError

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Values of `x` on the grid (times the scale), with the scheme's gradients."""
        raise NotImplementedError

    def observe(self, x: torch.Tensor) -> None:
        """Calibration: initialise parameters from float values `x` (default: nothing)."""

    # -- the fake-quant protocol ---------------------------------------------------------------
    @property
    def calibrating(self) -> bool:
        """Observer on and fake quant off: what `set_mode(..., "calibrate")` sets."""
        return bool(self.observer_enabled[0]) and not bool(self.fake_quant_enabled[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrate (return `x`), fake-quantize, or pass through when fake quant is off."""
        if self.calibrating:
            with torch.no_grad():
                self.observe(x.detach())
                self.initialized.fill_(1)
            return x
        if not bool(self.fake_quant_enabled[0]):
            return x
        if not bool(self.initialized):
            with torch.no_grad():
                self.observe(x.detach())
                self.initialized.fill_(1)
        return self.fake_quantize(x)

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point 0) of the grid: what `convert_pt2e` writes into the integer program."""
        scale = self.grid_scale().detach().to(torch.float32).clamp(min=EPS).reshape(-1)
        return scale.clone(), torch.zeros_like(scale, dtype=torch.int64)

    def grid_ready(self) -> None:
        """Raise when this quantizer cannot give integer codes (overridden by non-uniform ones)."""

    def extra_repr(self) -> str:
        """Scheme, bits, grid and flags."""
        return (f"scheme={self.scheme or type(self).__name__}, bits={self.bits}, "
                f"grid=[{self.quant_min}, {self.quant_max}], per_channel={self.per_channel}, "
                f"fake_quant_enabled={int(self.fake_quant_enabled[0])}, observer_enabled={int(self.observer_enabled[0])}")

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        # per-channel or per-group tensors are sized at calibration: take the checkpoint's size
        with torch.no_grad():
            for name, tensor in list(self._parameters.items()) + list(self._buffers.items()):
                saved = state_dict.get(prefix + name)
                if tensor is not None and isinstance(saved, torch.Tensor) and saved.shape != tensor.shape:
                    tensor.data = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class ClippedGridFakeQuantize(GridFakeQuantize):
    """An activation grid over [0, r] (unsigned) or [-r, r] (signed, symmetric), r initialised in
    calibration from the observed values: per batch, the clip that minimises the mean squared
    error of the values on this grid (searched from 5 % to 100 % of the batch's largest |x|),
    averaged over the calibration batches. The base of PACT's and DoReFa's activations.

    Why not the largest value: on a 2-4 bit grid the largest value wastes most levels on rare
    outliers, and the march's int8 quantizer in front of the layer input clips below it during QAT,
    so a PACT clip set at the maximum never sees an input above it and never gets a gradient."""

    SEARCH_STEPS = 96
    SAMPLE = 1 << 16
    """Values of a batch the clip search looks at (a fixed-stride subsample of larger batches)."""

    def __init__(self, quant_min: int, quant_max: int, bits: int, signed: bool) -> None:
        super().__init__(quant_min, quant_max, bits)
        self.signed = signed
        self.register_buffer("range_sum", torch.zeros(1))
        self.register_buffer("batches", torch.zeros(1))

    def best_clip(self, x: torch.Tensor) -> torch.Tensor:
        """The clip of this grid with the least squared error on `x` (a [1] tensor, at least EPS)."""
        flat = x.detach().reshape(-1).float()
        if flat.numel() > self.SAMPLE:
            flat = flat[:: flat.numel() // self.SAMPLE + 1]
        values = flat if self.signed else flat.clamp(min=0)
        top = values.abs().amax().clamp(min=EPS)
        clips = top * torch.linspace(0.05, 1.0, self.SEARCH_STEPS, device=top.device)
        low = -clips if self.signed else torch.zeros_like(clips)
        y = torch.maximum(torch.minimum(values[None, :], clips[:, None]), low[:, None])
        step = clips[:, None] / max(1, self.quant_max)
        codes = torch.clamp(torch.round(y / step), self.quant_min, self.quant_max)
        errors = ((codes * step - values[None, :]) ** 2).mean(dim=1)
        return clips[int(torch.argmin(errors))].reshape(1)

    def observed_range(self, x: torch.Tensor) -> torch.Tensor:
        """Add this batch's best clip to the running mean; return the mean (at least EPS)."""
        self.range_sum += self.best_clip(x)
        self.batches += 1
        return (self.range_sum / self.batches).clamp(min=EPS)

    def clip_and_round(self, x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        """`x` clamped to the range (gradient 1 inside it; `clip` may carry a gradient: PACT's),
        then rounded on the grid with the straight-through estimator."""
        low = -clip if self.signed else torch.zeros_like(clip)
        y = torch.maximum(torch.minimum(x, clip), low)
        step = clip / max(1, self.quant_max)
        codes = torch.clamp(torch.round(y / step), self.quant_min, self.quant_max)
        return y + (codes * step - y).detach()


def per_output_channel(values: torch.Tensor, groups: int) -> torch.Tensor:
    """Statistics per output channel of a weight: `values` [C, ...] reduced to the `groups` layout:
    [C] (groups 0), [1] (groups 1) or [G] (G groups of C / G consecutive channels)."""
    channels = values.shape[0]
    flat = values.reshape(channels, -1)
    if groups == 0:
        return flat
    if channels % groups:
        raise ValueError(f"{channels} output channels do not split into {groups} quantization groups")
    return flat.reshape(groups, -1)


def expand_groups(per_group: torch.Tensor, channels: int) -> torch.Tensor:
    """A per-group vector [G] repeated to one value per output channel [C] (differentiable)."""
    per_group = per_group.reshape(-1)
    if per_group.numel() == channels:
        return per_group
    return per_group.repeat_interleave(channels // per_group.numel())


def channel_view(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel [C] vector shaped to broadcast over a weight like `like` ([C, 1, 1, 1])."""
    return scale.reshape(-1, *([1] * (like.dim() - 1)))
