"""The `mobilenet_v1` family object: recipe schema and model building."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator

from hatcli.family import FamilyConfig
from hatcli.tasks.classification import ClassificationFamily
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
