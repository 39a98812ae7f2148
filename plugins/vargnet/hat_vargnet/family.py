"""The `vargnet_v2` family object: recipe schema and model building."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from hatcli.family import FamilyConfig
from hatcli.tasks.classification import ClassificationFamily
from hat_vargnet.model import IMAGENET_UNITS, TINY_UNITS, VargNetV2, scaled_channels


class VargNetV2Config(FamilyConfig):
    """`[model]` table of `vargnet_v2`."""

    variant: Literal["vargnetv2", "tiny"] = "vargnetv2"
    """`vargnetv2`: 1, 3, 7, 4 blocks per stage (HAT's VargNetV2); `tiny`: 1, 3, 4, 2 (TinyVargNetV2)."""
    alpha: float = Field(1.0, gt=0, le=4)
    """Width multiplier of the stem and every stage (channels rounded to multiples of `group_base`)."""
    group_base: Literal[4, 8, 16] = 8
    """Input channels per group of every grouped conv (8: a multiple of 8, as the BPU marches want)."""
    factor: int = Field(2, ge=1, le=8)
    """How much each grouped conv widens the channels before its 1x1 conv."""
    head_factor: int = Field(1, ge=1, le=8)
    """The same for the first stage."""
    stem_stride: Literal[1, 2] = 2
    """1 keeps full resolution into the first stage (32x32 inputs)."""
    stage_strides: list[Literal[1, 2]] = [2, 2, 2, 2]
    """The stride of each stage's first block."""
    last_channels: int = Field(1024, gt=0)
    """Channels of the 1x1 conv before global pooling."""
    dropout: float = Field(0.0, ge=0, lt=1)

    def units(self) -> tuple[int, ...]:
        """Blocks per stage of the chosen variant."""
        return IMAGENET_UNITS if self.variant == "vargnetv2" else TINY_UNITS

    @model_validator(mode="after")
    def _check_strides(self) -> VargNetV2Config:
        if len(self.stage_strides) != len(self.units()):
            raise ValueError(f"`stage_strides` needs {len(self.units())} values (one per stage), "
                             f"got {len(self.stage_strides)}")
        return self


class VargNetV2Family(ClassificationFamily):
    """VargNetV2 (variable group convolutions; HAT's model zoo) for classification."""

    name: ClassVar[str] = "vargnet_v2"
    config_class: ClassVar[type[FamilyConfig]] = VargNetV2Config
    description: ClassVar[str] = "VargNetV2 (variable group convolutions, HAT model zoo), classification"

    def tiny_config(self) -> FamilyConfig:
        """TinyVargNetV2 at half width with a narrow head, for tests that run every family."""
        return VargNetV2Config(name=self.name, variant="tiny", alpha=0.5, last_channels=64)

    def build_float_model(self, config: FamilyConfig, num_classes: int) -> torch.nn.Module:
        """Build VargNetV2 from the recipe's `[model]` table."""
        assert isinstance(config, VargNetV2Config)
        return VargNetV2(num_classes, scaled_channels(config.alpha, config.group_base), config.units(),
                         factor=config.factor, head_factor=config.head_factor, group_base=config.group_base,
                         stem_stride=config.stem_stride, stage_strides=config.stage_strides,
                         last_channels=config.last_channels, dropout=config.dropout)
