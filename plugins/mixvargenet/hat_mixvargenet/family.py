"""The `mixvargenet` family object: recipe schema and model building."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hatcli.family import FamilyConfig
from hatcli.tasks.classification import ClassificationFamily
from hat_mixvargenet.model import IMAGENET_STAGES, MixVarGENet, StageSpec, check_groups, fusion_plan

BlockName = Literal["mixvarge_f2", "mixvarge_f4", "mixvarge_f2_gb16"]


class StageTable(BaseModel):
    """One entry of `[model] stages` (HAT's `MixVarGENetConfig`; input channels follow the previous stage)."""

    model_config = ConfigDict(extra="forbid")

    out_channels: int = Field(gt=0)
    head_op: BlockName
    stack_ops: list[BlockName] = []
    stride: Literal[1, 2]
    fusion_strides: list[int] = []
    """Output strides of earlier stages whose downsampled features the head block adds."""
    extra_downsample_num: int = Field(0, ge=0, le=3)
    """3x3 stride-2 downsampled copies of this stage's output, for later stages to fuse."""


def scale_channels(channels: int, width: float) -> int:
    """`channels * width`, rounded to a multiple of 16 (at least 16) unless width is 1, so that
    grouped blocks keep whole groups of 16 channels."""
    if width == 1.0:
        return channels
    return max(16, int(channels * width / 16 + 0.5) * 16)


class MixVarGENetConfig(FamilyConfig):
    """`[model]` table of `mixvargenet`."""

    num_classes: int | None = Field(None, gt=1)
    """Number of classes; by default the packed dataset's class count."""
    width: float = Field(1.0, gt=0, le=4)
    """Multiplier of the stem's and every stage's channels (rounded to multiples of 16 when not 1)."""
    stem_channels: int = Field(32, gt=0)
    stem_stride: int = Field(2, ge=1, le=2)
    """1 keeps full resolution into stage 1 (32x32 inputs)."""
    stages: list[StageTable] | None = None
    """The stages; default HAT's 5-stage ImageNet configuration (`hat_mixvargenet.model.IMAGENET_STAGES`)."""
    stage_strides: list[Literal[1, 2]] | None = None
    """Override of each stage's head stride (one value per stage), e.g. for small inputs."""
    fc_channels: int = Field(1024, gt=0)
    """Channels of the 1x1 conv before global pooling."""
    dropout: float = Field(0.0, ge=0, lt=1)

    def stage_specs(self) -> list[StageSpec]:
        """The stages the network is built from: `stages` (or the default), width and strides applied."""
        if self.stages is None:
            specs = list(IMAGENET_STAGES)
        else:
            specs = [StageSpec(t.out_channels, t.head_op, tuple(t.stack_ops), t.stride, tuple(t.fusion_strides),
                               t.extra_downsample_num) for t in self.stages]
        strides = self.stage_strides or [s.stride for s in specs]
        return [StageSpec(scale_channels(s.out_channels, self.width), s.head_op, s.stack_ops, stride,
                          s.fusion_strides, s.extra_downsample_num) for s, stride in zip(specs, strides)]

    def stem_width(self) -> int:
        """Output channels of the stem after the width multiplier."""
        return scale_channels(self.stem_channels, self.width)

    @model_validator(mode="after")
    def _check_layout(self) -> MixVarGENetConfig:
        count = len(self.stages) if self.stages is not None else len(IMAGENET_STAGES)
        if self.stages is not None and not self.stages:
            raise ValueError("`stages` needs at least one stage")
        if self.stage_strides is not None and len(self.stage_strides) != count:
            raise ValueError(f"`stage_strides` needs {count} values (one per stage), got {len(self.stage_strides)}")
        specs = self.stage_specs()
        check_groups(specs, self.stem_width())
        fusion_plan(specs, self.stem_stride)
        return self


class MixVarGENetFamily(ClassificationFamily):
    """MixVarGENet (HAT's Journey 5 reference backbone) with a 1x1-conv head, for classification."""

    name: ClassVar[str] = "mixvargenet"
    config_class: ClassVar[type[FamilyConfig]] = MixVarGENetConfig
    description: ClassVar[str] = "MixVarGENet (Journey 5 reference backbone), classification"

    def tiny_config(self) -> FamilyConfig:
        """The ImageNet layout at half width with a narrow head, for tests that run every family."""
        return MixVarGENetConfig(name=self.name, width=0.5, fc_channels=128)

    def build_float_model(self, config: FamilyConfig, num_classes: int) -> torch.nn.Module:
        """Build MixVarGENet from the recipe's `[model]` table."""
        assert isinstance(config, MixVarGENetConfig)
        return MixVarGENet(num_classes=num_classes, stages=config.stage_specs(), stem_channels=config.stem_width(),
                           stem_stride=config.stem_stride, fc_channels=config.fc_channels, dropout=config.dropout)
