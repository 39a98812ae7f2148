"""The `unet` family: its `[model]` schema, the network, and the stride-aware decoding.

Which march rules matter (nash_e, `hatcli/quant/marches/nash_e.toml` `[ops]`): every conv is 3x3
(or the 1x1 classifier), well inside Conv `max_kernel = 9`, with strides 1 and 2 (`max_stride =
4`); dilation is not part of that kernel rule (J5's bayes_e lists dilation 1..16 with the input
divisible by it, so `dilation` stops at 16 and inputs are multiples of `2**depth`); `Resize` runs
nearest and bilinear on the BPU; `Concat`, `Add` and `Relu` are BPU ops. The classifier is the
graph output: on `float_output = false` marches it gives its int32 accumulator, dequantized.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, model_validator

from hatcli.family import FamilyConfig
from hatcli.tasks.library_models import context_input_size
from hatcli.tasks.segmentation import SegmentationFamily
from hat_unet.model import UNet

MIN_BOTTLENECK = 2
"""The smallest side (pixels) of the bottleneck feature map a recipe may ask for."""


class UNetConfig(FamilyConfig):
    """`[model]` table of `unet`."""

    base_channels: int = Field(16, ge=4, le=256)
    """Width of the full-resolution level; each deeper level doubles it."""
    depth: int = Field(3, ge=1, le=6)
    """Number of stride-2 downsamplings (the bottleneck is at stride `2**depth`)."""
    dilation: int = Field(2, ge=1, le=16)
    """Dilation of the residual 3x3 context conv at the bottleneck; 1: no context block."""
    upsample: Literal["nearest", "bilinear"] = "nearest"
    """How the decoder doubles the resolution (bilinear: half-pixel centres)."""
    output_stride: Literal[1, 2, 4, 8] = 1
    """How much coarser than the input the logits are (at most `2**depth`); the loss, the metric
    and `predict` upsample them bilinearly."""

    @model_validator(mode="after")
    def _check_shape(self, info: ValidationInfo) -> UNetConfig:
        if self.output_stride > 2 ** self.depth:
            raise ValueError(f"output_stride {self.output_stride} is coarser than the bottleneck "
                             f"(stride 2**depth = {2 ** self.depth})")
        size = context_input_size(info)
        if size is not None:
            check_input_size(self, size)
        return self


def check_input_size(config: UNetConfig, size: tuple[int, int]) -> None:
    """ValueError unless input (H, W) `size` halves exactly `config.depth` times down to a
    bottleneck of at least `MIN_BOTTLENECK` pixels a side, wider than the context dilation."""
    stride = 2 ** config.depth
    if any(side % stride for side in size):
        raise ValueError(f"depth {config.depth} needs input sides divisible by {stride}, got {size[0]}x{size[1]}")
    bottleneck = min(size) // stride
    if bottleneck < MIN_BOTTLENECK:
        raise ValueError(f"depth {config.depth} is too deep for a {size[0]}x{size[1]} input: the bottleneck "
                         f"would be {size[0] // stride}x{size[1] // stride} (at least {MIN_BOTTLENECK} a side)")
    if config.dilation > 1 and config.dilation >= bottleneck:
        raise ValueError(f"dilation {config.dilation} reaches past a {bottleneck}-pixel bottleneck "
                         f"(input {size[0]}x{size[1]}, depth {config.depth}): only the centre tap would "
                         f"see the feature map; use a dilation below {bottleneck}")


class UNetFamily(SegmentationFamily):
    """UNet-style encoder-decoder (see `hat_unet.model`) for semantic segmentation."""

    name: ClassVar[str] = "unet"
    config_class: ClassVar[type[FamilyConfig]] = UNetConfig
    description: ClassVar[str] = ("UNet encoder-decoder (stride-2 convs, dilated context, nearest/bilinear "
                                  "upsampling, skip concat), segmentation")
    min_input_size: ClassVar[tuple[int, int]] = (32, 32)
    """Three halvings (the default depth) down to a 4x4 bottleneck, wider than dilation 2."""

    def tiny_config(self) -> FamilyConfig:
        """Eight channels at full resolution, the default depth, dilation and upsampling."""
        return UNetConfig(name=self.name, base_channels=8)

    def _config(self, config: FamilyConfig | None) -> UNetConfig:
        if config is None:
            return UNetConfig(name=self.name)
        assert isinstance(config, UNetConfig)
        return config

    def stride_of(self, config: FamilyConfig | None) -> int:
        """The `[model]` table's `output_stride` (what the base class's `predict` and
        `describe_outputs` upsample by)."""
        return self._config(config).output_stride

    def build_float_model(self, config: FamilyConfig, num_classes: int) -> torch.nn.Module:
        """Build the UNet from the recipe's `[model]` table."""
        cfg = self._config(config)
        return UNet(num_classes, cfg.base_channels, cfg.depth, cfg.dilation, cfg.upsample, cfg.output_stride)
