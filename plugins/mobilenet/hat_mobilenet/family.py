"""The `mobilenet_v1` and `mobilenet_v2` family objects: recipe schemas and model building."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator

from hatcli.family import FamilyConfig
from hatcli.tasks.classification import ClassificationFamily
from hat_mobilenet.mobilenet_v2 import STRIDES, MobileNetV2
from hat_mobilenet.model import BLOCKS, MobileNetV1


class MobileNetV1Config(FamilyConfig):
    """`[model]` table of `mobilenet_v1`."""

    alpha: float = Field(1.0, gt=0, le=2)
    """Width multiplier: every layer's channels are scaled by alpha (HAT uses 1.0 / 0.75 / 0.5 / 0.25)."""
    num_classes: int | None = Field(None, gt=1)
    """Number of classes; by default the packed dataset's class count."""
    stem_stride: int = Field(2, ge=1, le=2)
    block_strides: list[int] | None = None
    """Strides of the 13 blocks; default is ImageNet's. Small inputs (32x32) use fewer stride-2 blocks."""
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _check_strides(self) -> "MobileNetV1Config":
        if self.block_strides is not None and (
            len(self.block_strides) != len(BLOCKS) or any(s not in (1, 2) for s in self.block_strides)
        ):
            raise ValueError(f"block_strides needs {len(BLOCKS)} values, each 1 or 2")
        return self


class MobileNetV1Family(ClassificationFamily):
    """MobileNetV1 with width multiplier alpha, for classification."""

    name: ClassVar[str] = "mobilenet_v1"
    config_class: ClassVar[type[FamilyConfig]] = MobileNetV1Config
    description: ClassVar[str] = "MobileNetV1 (width multiplier alpha), classification"

    def tiny_config(self) -> FamilyConfig:
        """MobileNetV1 at a quarter width, for tests that run every family."""
        return MobileNetV1Config(name=self.name, alpha=0.25)

    def build_float_model(self, config: FamilyConfig, num_classes: int) -> torch.nn.Module:
        """Build MobileNetV1 from the recipe's `[model]` table."""
        assert isinstance(config, MobileNetV1Config)
        strides = tuple(config.block_strides) if config.block_strides else None
        return MobileNetV1(num_classes=num_classes, alpha=config.alpha, stem_stride=config.stem_stride,
                           block_strides=strides, dropout=config.dropout)


class MobileNetV2Config(FamilyConfig):
    """`[model]` table of `mobilenet_v2`."""

    alpha: float = Field(1.0, gt=0, le=2)
    """Width multiplier: channels are scaled by alpha and rounded to a multiple of 8 (torchvision's
    `width_mult`); the last 1x1 conv keeps 1280 channels unless alpha > 1."""
    num_classes: int | None = Field(None, gt=1)
    """Number of classes; by default the packed dataset's class count."""
    stem_stride: int = Field(2, ge=1, le=2)
    """Stride of the stem conv: 2 for ImageNet, 1 for CIFAR-size (32x32) inputs."""
    block_strides: list[int] | None = None
    """Strides of the 17 inverted residual blocks; default is ImageNet's (1, 2,1, 2,1,1, 2,1,1,1, 1,1,1, 2,1,1, 1)."""
    dropout: float = Field(0.2, ge=0, lt=1)
    """Dropout before the classifier (torchvision's 0.2)."""

    @model_validator(mode="after")
    def _check_strides(self) -> "MobileNetV2Config":
        if self.block_strides is not None and (
            len(self.block_strides) != len(STRIDES) or any(s not in (1, 2) for s in self.block_strides)
        ):
            raise ValueError(f"block_strides needs {len(STRIDES)} values, each 1 or 2")
        return self


class MobileNetV2Family(ClassificationFamily):
    """MobileNetV2 (torchvision's layout) with width multiplier alpha, for classification."""

    name: ClassVar[str] = "mobilenet_v2"
    config_class: ClassVar[type[FamilyConfig]] = MobileNetV2Config
    description: ClassVar[str] = "MobileNetV2 (inverted residuals, width multiplier alpha), classification"
    min_input_size: ClassVar[tuple[int, int]] = (32, 32)
    """Five stride-2 layers by default: 32x32 reaches the classifier as 1x1."""

    def tiny_config(self) -> FamilyConfig:
        """MobileNetV2 at a quarter width, for tests that run every family."""
        return MobileNetV2Config(name=self.name, alpha=0.25)

    def build_float_model(self, config: FamilyConfig, num_classes: int) -> torch.nn.Module:
        """Build MobileNetV2 from the recipe's `[model]` table."""
        assert isinstance(config, MobileNetV2Config)
        strides = tuple(config.block_strides) if config.block_strides else None
        return MobileNetV2(num_classes=num_classes, alpha=config.alpha, stem_stride=config.stem_stride,
                           block_strides=strides, dropout=config.dropout)
