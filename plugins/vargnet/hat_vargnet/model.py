"""VargNetV2: a classifier built from variable group convolutions.

VarGNet (Zhang et al., "VarGNet: Variable Group Convolutional Neural Network for Efficient
Embedded Computing", 2019) fixes the number of *channels per group* of a grouped convolution
(`group_base`, 8 here) instead of the number of groups, so that every grouped conv of the network
has the same computing pattern, which an embedded accelerator runs efficiently. A *variable group
separable conv* is a k x k grouped conv with `group_base` input channels per group that widens
the channels by `factor`, then a 1x1 conv back to the block's width, each with BatchNorm.

A block (`VarGBlock`) is two of them in sequence plus a shortcut, the sum activated; a stage's
first block strides 2, and its shortcut is one more variable group separable conv (stride 2)
where the shape changes. A stage's first block can also merge a second branch (another variable
group separable conv of the input, added after the first one): the paper's down-sampling block,
which gathers more features where the resolution halves.

The layout is HAT's VargNetV2 as its model zoo names it: a 3x3 stride-2 stem of 32 channels,
then four stages of 32, 64, 128 and 256 channels with 1, 3, 7 and 4 blocks (the first stage
without the merged branch, expanding by `head_factor`), each starting at stride 2; a 1x1 conv to
1024 channels, global average pooling and the class layer. Channels scale with `alpha` (kept
multiples of `group_base`). The output strides are 2 (stem), 4, 8, 16 and 32.

Measured with `hat calops`, 1000 classes, 1x3x224x224: 0.360 G MACs and 3.61 M parameters
(1.03 M of them the class layer). The recipe's CIFAR-10 network (`alpha = 0.5`, a 256-channel
head, `stem_stride = 1`) is 10 M MACs and 1.04 M parameters at 1x3x32x32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hatcli.nn_init import init_conv_bn_

IMAGENET_CHANNELS = (32, 32, 64, 128, 256)
"""The stem's channels, then each stage's."""
IMAGENET_UNITS = (1, 3, 7, 4)
"""Blocks per stage (HAT's `VargNetV2`; `TinyVargNetV2` has (1, 3, 4, 2))."""
TINY_UNITS = (1, 3, 4, 2)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = False) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU): the unit the quantizer folds and fuses."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def groups_of(channels: int, group_base: int) -> int:
    """Groups of a variable group conv over `channels` inputs; ValueError when they do not split
    into whole groups of `group_base`."""
    if channels % group_base:
        raise ValueError(f"a variable group conv needs a multiple of {group_base} input channels "
                         f"(group_base), got {channels}")
    return channels // group_base


class VarGSeparable(nn.Sequential):
    """A k x k grouped conv (`group_base` channels per group) widening `cin` by `factor`, BN and
    ReLU, then a 1x1 conv to `cout` and BN (+ ReLU when `pw_relu`)."""

    def __init__(self, cin: int, cout: int, stride: int, factor: int, group_base: int, kernel: int = 3,
                 pw_relu: bool = False) -> None:
        super().__init__(conv_bn(cin, cin * factor, kernel, stride, groups_of(cin, group_base), relu=True),
                         conv_bn(cin * factor, cout, 1, relu=pw_relu))


class VarGBlock(nn.Module):
    """Two variable group separable convs and a shortcut, the sum activated (see the module
    docstring); `merge_branch` adds a second separable conv of the input after the first."""

    def __init__(self, cin: int, cout: int, stride: int, factor: int, group_base: int,
                 merge_branch: bool = False) -> None:
        super().__init__()
        self.branch = VarGSeparable(cin, cout, stride, factor, group_base) if merge_branch else None
        self.conv = VarGSeparable(cin, cout, stride, factor, group_base, pw_relu=not merge_branch)
        self.merge_relu = nn.ReLU(inplace=True) if merge_branch else None
        self.out_conv = VarGSeparable(cout, cout, 1, factor, group_base)
        self.shortcut = (VarGSeparable(cin, cout, stride, factor, group_base)
                         if stride != 1 or cin != cout else None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output: relu(out_conv(conv(x) [+ branch(x), activated]) + shortcut(x))."""
        identity = x if self.shortcut is None else self.shortcut(x)
        y = self.conv(x)
        if self.branch is not None and self.merge_relu is not None:
            y = self.merge_relu(y + self.branch(x))
        return self.relu(self.out_conv(y) + identity)


class VargNetV2(nn.Module):
    """VargNetV2 classifier (module docstring): stem, four stages, 1x1 conv head, pooling, linear."""

    def __init__(self, num_classes: int, channels: Sequence[int] = IMAGENET_CHANNELS,
                 units: Sequence[int] = IMAGENET_UNITS, factor: int = 2, head_factor: int = 1, group_base: int = 8,
                 stem_stride: int = 2, stage_strides: Sequence[int] = (2, 2, 2, 2), last_channels: int = 1024,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if len(channels) != len(units) + 1 or len(stage_strides) != len(units):
            raise ValueError(f"VargNetV2 needs one channel count for the stem and one per stage, and one stride "
                             f"per stage: got {len(channels)} channels, {len(units)} stages, "
                             f"{len(stage_strides)} strides")
        self.stem = conv_bn(3, channels[0], 3, stem_stride, relu=True)
        stages, cin = [], channels[0]
        for number, (cout, count, stride) in enumerate(zip(channels[1:], units, stage_strides)):
            first = number == 0
            blocks = [VarGBlock(cin, cout, stride, head_factor if first else factor, group_base,
                                merge_branch=not first)]
            blocks += [VarGBlock(cout, cout, 1, factor, group_base) for _ in range(count - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = conv_bn(cin, last_channels, 1, relu=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.classifier = nn.Linear(last_channels, num_classes)
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of images (N, 3, H, W)."""
        y = self.head(self.stages(self.stem(x)))
        return self.classifier(self.dropout(torch.flatten(self.pool(y), 1)))


def scaled_channels(alpha: float, group_base: int, channels: Sequence[int] = IMAGENET_CHANNELS) -> list[int]:
    """`channels * alpha`, each rounded to a multiple of `group_base` (at least one group)."""
    return [max(group_base, int(c * alpha / group_base + 0.5) * group_base) for c in channels]
