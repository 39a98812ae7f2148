"""MixVarGENet's building blocks: the basic two-conv block, its named variants, and a stage.

A `BasicMixVarGEBlock` widens with a 3x3 conv (`factor` times its input channels, optionally
grouped with `group_base` channels per group) and projects back with a dense 1x1 conv; the
shortcut is the identity, or a strided 1x1 conv + BN when the shape changes. Both are added and
go through a ReLU. A `MixVarGEStage` is a head block (which may stride) followed by stacked
stride-1 blocks, plus optional 3x3 stride-2 "downsample" convs whose outputs a later stage fuses
into its head block (a 1x1 conv + BN of the earlier feature, added before the final ReLU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BlockSpec:
    """What distinguishes the named block variants."""

    factor: int
    """Channel expansion of the first (3x3) conv: its output has `factor * in_channels`."""
    group_base: int | None = None
    """Input channels per group of the first conv; None: a dense conv."""


BLOCKS: dict[str, BlockSpec] = {
    "mixvarge_f2": BlockSpec(factor=2),
    "mixvarge_f4": BlockSpec(factor=4),
    "mixvarge_f2_gb16": BlockSpec(factor=2, group_base=16),
}
"""The block variants by the names HAT's MixVarGENet configuration uses."""


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
            relu: bool = False) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU): the unit the quantizer folds and fuses."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def conv1_groups(in_channels: int, spec: BlockSpec) -> int:
    """Groups of a block's first conv; ValueError when the channels do not split into groups."""
    if spec.group_base is None:
        return 1
    if in_channels % spec.group_base:
        raise ValueError(f"a block with {spec.group_base} channels per group needs input channels "
                         f"that are a multiple of {spec.group_base}, got {in_channels}")
    return in_channels // spec.group_base


class BasicMixVarGEBlock(nn.Module):
    """3x3 conv (x factor, maybe grouped) + BN + ReLU, 1x1 conv + BN, plus shortcut, ReLU.

    `fusion_channels` lists the channels of earlier, already downsampled features that this block
    adds (each through a 1x1 conv + BN) before its final ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, spec: BlockSpec,
                 fusion_channels: Sequence[int] = ()) -> None:
        super().__init__()
        mid = in_channels * spec.factor
        self.conv1 = conv_bn(in_channels, mid, 3, stride, conv1_groups(in_channels, spec), relu=True)
        self.conv2 = conv_bn(mid, out_channels, 1)
        self.downsample = (conv_bn(in_channels, out_channels, 1, stride)
                           if stride != 1 or in_channels != out_channels else None)
        self.fusion = nn.ModuleList(conv_bn(c, out_channels, 1) for c in fusion_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, fusion_inputs: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Return the block's output; `fusion_inputs` match `fusion_channels` one to one."""
        if len(fusion_inputs) != len(self.fusion):
            raise ValueError(f"expected {len(self.fusion)} fusion inputs, got {len(fusion_inputs)}")
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x)) + identity
        for layer, feature in zip(self.fusion, fusion_inputs):
            out = out + layer(feature)
        return self.relu(out)


class MixVarGEStage(nn.Module):
    """A head block (which may stride), stacked stride-1 blocks, and optional downsample convs.

    `forward` returns the stage output and the list of its successively 2x-downsampled copies
    (3x3 stride-2 conv + BN each, `extra_downsample_num` of them), which later stages fuse.
    """

    def __init__(self, in_channels: int, out_channels: int, head_op: str, stack_ops: Sequence[str],
                 stride: int, fusion_channels: Sequence[int] = (), extra_downsample_num: int = 0) -> None:
        super().__init__()
        self.head = BasicMixVarGEBlock(in_channels, out_channels, stride, BLOCKS[head_op], fusion_channels)
        self.stack = nn.Sequential(*(BasicMixVarGEBlock(out_channels, out_channels, 1, BLOCKS[op])
                                     for op in stack_ops))
        self.downsample_layers = nn.ModuleList(conv_bn(out_channels, out_channels, 3, 2)
                                               for _ in range(extra_downsample_num))

    def forward(self, x: torch.Tensor, fusion_inputs: Sequence[torch.Tensor] = ()
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return (stage output, its downsampled copies at 2x, 4x, ... the output's stride)."""
        x = self.stack(self.head(x, fusion_inputs))
        downsampled = []
        feature = x
        for layer in self.downsample_layers:
            feature = layer(feature)
            downsampled.append(feature)
        return x, downsampled
