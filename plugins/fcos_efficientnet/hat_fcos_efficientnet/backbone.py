"""EfficientNet-B0 without its top (Tan & Le, 2019), in HAT's BPU form: ReLU, squeeze-excite optional.

HAT's `efficientnet(model_type="b0", activation="relu", use_se_block=False, include_top=False)`
replaces SiLU by ReLU and drops squeeze-excite: both run as plain integer ops on the BPU. The
network returns the last feature map of every resolution, at strides 2, 4, 8, 16 and 32
(16, 24, 40, 112 and 320 channels at width 1.0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hatcli.nn_init import init_conv_bn_


@dataclass(frozen=True)
class Stage:
    """One row of the EfficientNet stage table (values of B0, before width / depth scaling)."""

    expand: int
    kernel: int
    stride: int
    channels: int
    repeats: int


B0_STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 16, 1),
    Stage(6, 3, 2, 24, 2),
    Stage(6, 5, 2, 40, 2),
    Stage(6, 3, 2, 80, 3),
    Stage(6, 5, 1, 112, 3),
    Stage(6, 5, 2, 192, 4),
    Stage(6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
FEATURE_STAGES = (0, 1, 2, 4, 6)
"""Stages whose output is returned: the last one at each stride (2, 4, 8, 16, 32)."""


def round_channels(channels: int, width_mult: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding: scale, round to a multiple of `divisor`, never below 90 %."""
    scaled = channels * width_mult
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def round_repeats(repeats: int, depth_mult: float) -> int:
    """EfficientNet's depth scaling: ceil(repeats * depth_mult)."""
    return int(math.ceil(repeats * depth_mult))


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU): the unit BatchNorm folding and activation fusion expect."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Channel attention: global mean, 1x1 reduce + ReLU, 1x1 expand + sigmoid, multiply."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reweight the channels of `x`."""
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(s))))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, (squeeze-excite), 1x1 project, residual add."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, se: bool) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1))
        layers.append(conv_bn(hidden, hidden, kernel, stride, groups=hidden))
        if se:
            layers.append(SqueezeExcite(hidden, max(1, cin // 4)))
        layers.append(conv_bn(hidden, cout, 1, relu=False))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block (plus its input when shapes match)."""
        y = self.block(x)
        return x + y if self.residual else y


class EfficientNet(nn.Module):
    """EfficientNet feature extractor: a stride-2 stem and the seven MBConv stages, no classifier.

    `forward` returns the five feature maps at strides 2, 4, 8, 16, 32 (`out_channels`).
    """

    def __init__(self, width_mult: float = 1.0, depth_mult: float = 1.0, se: bool = False) -> None:
        super().__init__()
        stem = round_channels(STEM_CHANNELS, width_mult)
        self.stem = conv_bn(3, stem, 3, 2)
        stages: list[nn.Module] = []
        cin = stem
        for stage in B0_STAGES:
            cout = round_channels(stage.channels, width_mult)
            blocks = [MBConv(cin if i == 0 else cout, cout, stage.expand, stage.kernel,
                             stage.stride if i == 0 else 1, se)
                      for i in range(round_repeats(stage.repeats, depth_mult))]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.out_channels = [round_channels(B0_STAGES[i].channels, width_mult) for i in FEATURE_STAGES]
        self.out_strides = [2, 4, 8, 16, 32]
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the feature maps at strides 2, 4, 8, 16 and 32."""
        x = self.stem(x)
        features = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in FEATURE_STAGES:
                features.append(x)
        return features
