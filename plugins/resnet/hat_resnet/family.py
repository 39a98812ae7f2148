"""The `resnet` family object: recipe schema and model building."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from hatcli.family import FamilyConfig
from hatcli.tasks.classification import ClassificationFamily
from hat_resnet.model import CIFAR_DEPTHS, IMAGENET_DEPTHS, BlockSpec, ResNet


class ResNetConfig(FamilyConfig):
    """`[model]` table of `resnet`."""

    depth: int = 18
    """18, 34 or 50: ImageNet layout (torchvision's resnet18/34/50; 50 uses Bottleneck blocks);
    20, 32 or 56: CIFAR layout (He et al. 2016: 16-32-64 channels, (depth - 2) / 6 BasicBlocks per stage)."""
    width: float = Field(1.0, gt=0, le=8)
    """Multiplier of the stem's and every stage's channels (rounded half up, at least 1); 1.0 is the paper's network."""
    stem: Literal["imagenet", "cifar", "auto"] = "auto"
    """`imagenet`: 7x7 stride-2 conv + 3x3 stride-2 max pool; `cifar`: 3x3 stride-1 conv, no pooling
    (CIFAR ResNet-18 is depth 18 with this stem); `auto`: cifar for depths 20/32/56, imagenet for 18/34/50."""
    order: Literal["post", "pre"] = "post"
    """`post`: conv -> BN -> activation, the sum activated (the original ResNet); `pre`: pre-activation
    (He et al., "Identity mappings"): BN -> activation -> conv, the sum not activated, BN -> activation
    before pooling. With `bireal`, `pre` is Bi-Real Net's own unit: activation -> conv -> BN, + shortcut."""
    shortcut: Literal["conv", "avgpool", "pad"] = "conv"
    """Shortcut where a block changes the shape. `conv`: strided 1x1 conv + BN (option B);
    `avgpool`: average pool (kernel = stride, ceil_mode, padding not counted) then 1x1 conv + BN
    (ResNet-D / Bi-Real); `pad`: subsample and zero-pad the channels, no parameters (option A, He
    et al.'s CIFAR networks). Pre-activation projection shortcuts have no BN."""
    bireal: bool = False
    """Bi-Real Net per-conv shortcuts: every 3x3 conv with its BN gets its own identity shortcut
    (the shape-changing one on the block's first conv). BasicBlock depths only (not 50)."""
    activation: Literal["relu", "prelu", "hardtanh", "none"] = "relu"
    """The nonlinearity everywhere (stem included): `relu`, `prelu` (one learned slope per channel),
    `hardtanh` (clamp to [-1, 1], BinaryNet's: signed, so sign activations after it stay +-1, and
    an integer clamp on every march) or `none` (no nonlinearity at all besides what the fake
    quantizers add; binary-network style)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout probability before the fc layer (0: none)."""

    @field_validator("depth")
    @classmethod
    def _check_depth(cls, depth: int) -> int:
        if depth not in IMAGENET_DEPTHS and depth not in CIFAR_DEPTHS:
            raise ValueError(f"depth must be 18, 34 or 50 (ImageNet layout) or 20, 32 or 56 "
                             f"(CIFAR layout), got {depth}")
        return depth

    @model_validator(mode="after")
    def _check_bireal(self) -> ResNetConfig:
        if self.bireal and IMAGENET_DEPTHS.get(self.depth, ("basic",))[0] != "basic":
            raise ValueError(f"bireal needs BasicBlocks, and depth {self.depth} is built from Bottleneck "
                             f"blocks: choose depth 18, 34, 20, 32 or 56, or bireal = false")
        return self

    def resolved_stem(self) -> Literal["imagenet", "cifar"]:
        """The stem `auto` stands for at this depth."""
        if self.stem != "auto":
            return self.stem
        return "cifar" if self.depth in CIFAR_DEPTHS else "imagenet"

    def block_spec(self) -> BlockSpec:
        """The structure keys as the model takes them."""
        return BlockSpec(order=self.order, shortcut=self.shortcut, bireal=self.bireal, activation=self.activation)


class ResNetFamily(ClassificationFamily):
    """ResNet (ImageNet 18/34/50, CIFAR 20/32/56) with structure variants, for classification."""

    name: ClassVar[str] = "resnet"
    config_class: ClassVar[type[FamilyConfig]] = ResNetConfig
    description: ClassVar[str] = ("ResNet-18/34/50 and CIFAR ResNet-20/32/56 (pre-activation, ResNet-D, "
                                  "Bi-Real variants), classification")
    min_input_size: ClassVar[tuple[int, int]] = (32, 32)

    def tiny_config(self) -> FamilyConfig:
        """CIFAR ResNet-20 at a quarter width (4-8-16 channels), for tests that run every family."""
        return ResNetConfig(name=self.name, depth=20, width=0.25)

    def build_float_model(self, config: FamilyConfig, num_classes: int) -> torch.nn.Module:
        """Build the ResNet the recipe's `[model]` table describes."""
        assert isinstance(config, ResNetConfig)
        return ResNet(num_classes=num_classes, depth=config.depth, width=config.width,
                      stem=config.resolved_stem(), spec=config.block_spec(), dropout=config.dropout)

    def build_deploy_model(self, float_model: torch.nn.Module) -> torch.nn.Module:
        """The same network, with pre-activation BatchNorms (which no conv precedes to fold them
        into) computed as depthwise 1x1 convs (`ResNet.deploy_copy`); post-activation networks
        are returned as they are."""
        assert isinstance(float_model, ResNet)
        return float_model.deploy_copy() if float_model.standalone_norms() else float_model
