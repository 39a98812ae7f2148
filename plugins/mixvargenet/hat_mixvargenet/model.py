"""MixVarGENet: the BPU-friendly backbone of Horizon's Journey 5 reference models, as a classifier.

The layout follows HAT's `MixVarGENet` and its ImageNet configuration (`IMAGENET_STAGES`): a 3x3
stride-2 stem with 32 channels, then five stages whose outputs lie at strides 2, 4, 8, 16 and 32:

| stage | head op (stride) | stacked ops | out channels | output at 224 |
|---|---|---|---|---|
| 1 | mixvarge_f2 (1) | - | 32 | 112 x 112 |
| 2 | mixvarge_f4 (2) | 2 x mixvarge_f4 | 32 | 56 x 56 |
| 3 | mixvarge_f4 (2) | 2 x mixvarge_f4 | 64 | 28 x 28 |
| 4 | mixvarge_f2_gb16 (2) | 6 x mixvarge_f2_gb16 | 96 | 14 x 14 |
| 5 | mixvarge_f2_gb16 (2) | 2 x mixvarge_f2_gb16 | 160 | 7 x 7 |

These channels (32 / 32 / 64 / 96 / 160) and block names are those of the stage list in HAT's
MixVarGENet configurations (`MixVarGENetConfig` entries, HAT's `basic_mixvargenet_module.py`
blocks). The classifier head
is HAT's: a 1x1 conv to 1024 channels + BN + ReLU, global average pooling, then the class layer.
HAT writes the class layer as a 1x1 conv + BN after a 7x7 average pool; here it is a `Linear`
after adaptive pooling, the same function at 224 (BN is affine, so a linear layer absorbs it)
that also works at any input size (32x32 CIFAR).

Measured with `hat calops` (hatcli/deploy/calops.py), 1000 classes, 1x3x224x224:
1,033,746,432 MACs (1.034 G) and 2,302,664 parameters (2.30 M). The stages at strides 2, 4 and 8
(dense 3x3 convs widened 2x and 4x) hold 91 % of the MACs: MixVarGENet spends its compute on
dense, wide convs, which the BPU runs efficiently, rather than on depthwise convs. At 1x3x32x32
with `stem_stride = 1` (the CIFAR recipe, 10 classes) it is 84,314,112 MACs (84.3 M) and
1,287,914 parameters (1.29 M).

The grouped convs of `mixvarge_f2_gb16` have 16 input channels per group: a multiple of 8, as
the bayes / nash marches' `group_channel_multiple` requires, so every conv runs on the BPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hatcli.nn_init import init_conv_bn_

from hat_mixvargenet.blocks import BLOCKS, MixVarGEStage, conv1_groups, conv_bn


@dataclass(frozen=True)
class StageSpec:
    """One stage of the network (HAT's `MixVarGENetConfig`, input channels implied)."""

    out_channels: int
    head_op: str
    stack_ops: tuple[str, ...]
    stride: int
    fusion_strides: tuple[int, ...] = ()
    """Output strides of earlier stages whose downsampled features this stage's head adds."""
    extra_downsample_num: int = 0
    """How many 3x3 stride-2 downsampled copies of the output later stages may fuse (0..3)."""


IMAGENET_STAGES: tuple[StageSpec, ...] = (
    StageSpec(32, "mixvarge_f2", (), 1),
    StageSpec(32, "mixvarge_f4", ("mixvarge_f4",) * 2, 2),
    StageSpec(64, "mixvarge_f4", ("mixvarge_f4",) * 2, 2),
    StageSpec(96, "mixvarge_f2_gb16", ("mixvarge_f2_gb16",) * 6, 2),
    StageSpec(160, "mixvarge_f2_gb16", ("mixvarge_f2_gb16",) * 2, 2),
)
"""HAT's 5-stage ImageNet MixVarGENet (no fusion)."""


def output_strides(stages: Sequence[StageSpec], stem_stride: int) -> list[int]:
    """Stride of each stage's output relative to the input image."""
    strides, current = [], stem_stride
    for stage in stages:
        current *= stage.stride
        strides.append(current)
    return strides


def stride2channels(stages: Sequence[StageSpec], stem_stride: int = 2) -> dict[int, int]:
    """Output channels at each stride a stage ends at (the last stage wins a shared stride),
    what a detection neck needs to know about the backbone."""
    return {s: stage.out_channels for s, stage in zip(output_strides(stages, stem_stride), stages)}


def fusion_plan(stages: Sequence[StageSpec], stem_stride: int) -> list[list[tuple[int, int]]]:
    """For each stage, the (earlier stage, downsample level) pairs its head fuses.

    Raises ValueError naming the stage when a block name is unknown, a fusion stride names no
    earlier stage with enough downsample layers, or two candidate source stages share a stride.
    """
    strides = output_strides(stages, stem_stride)
    plan: list[list[tuple[int, int]]] = []
    for i, stage in enumerate(stages):
        for op in (stage.head_op, *stage.stack_ops):
            if op not in BLOCKS:
                raise ValueError(f"stage {i + 1}: unknown block `{op}` (blocks: {', '.join(BLOCKS)})")
        if not 0 <= stage.extra_downsample_num <= 3:
            raise ValueError(f"stage {i + 1}: extra_downsample_num must be 0..3")
        sources = []
        for fusion_stride in stage.fusion_strides:
            candidates = [j for j in range(i) if strides[j] == fusion_stride and stages[j].extra_downsample_num]
            if len(candidates) != 1:
                what = "no earlier stage with downsample layers" if not candidates else "several earlier stages"
                raise ValueError(f"stage {i + 1}: fusion stride {fusion_stride}: {what} ends at that stride")
            j = candidates[0]
            levels = stages[j].extra_downsample_num
            ratio, rest = divmod(strides[i], fusion_stride)
            reachable = [2 ** (k + 1) for k in range(levels)]  # downsample layer k gives 2^(k+1) x
            if rest or ratio not in reachable:
                raise ValueError(f"stage {i + 1} (stride {strides[i]}) cannot fuse stride {fusion_stride}: "
                                 f"stage {j + 1} has {levels} downsample layers "
                                 f"(stride {fusion_stride} x {', x '.join(map(str, reachable))})")
            sources.append((j, reachable.index(ratio)))
        plan.append(sources)
    return plan


def check_groups(stages: Sequence[StageSpec], stem_channels: int) -> None:
    """Raise ValueError naming the stage when a grouped block's input channels do not divide."""
    cin = stem_channels
    for i, stage in enumerate(stages):
        for k, op in enumerate((stage.head_op, *stage.stack_ops)):
            try:
                conv1_groups(cin if k == 0 else stage.out_channels, BLOCKS[op])
            except ValueError as exc:
                raise ValueError(f"stage {i + 1}, block {k + 1} (`{op}`): {exc}") from None
        cin = stage.out_channels


class MixVarGENet(nn.Module):
    """Stem, MixVarGE stages (with optional cross-stride fusion), 1x1 conv head, pool, classifier."""

    def __init__(self, num_classes: int, stages: Sequence[StageSpec] = IMAGENET_STAGES,
                 stem_channels: int = 32, stem_stride: int = 2, fc_channels: int = 1024,
                 dropout: float = 0.0) -> None:
        super().__init__()
        check_groups(stages, stem_channels)
        self.fusion_sources = fusion_plan(stages, stem_stride)
        self.stem = conv_bn(3, stem_channels, 3, stem_stride, relu=True)
        layers, cin = [], stem_channels
        for stage, sources in zip(stages, self.fusion_sources):
            layers.append(MixVarGEStage(cin, stage.out_channels, stage.head_op, stage.stack_ops, stage.stride,
                                        [stages[j].out_channels for j, _ in sources], stage.extra_downsample_num))
            cin = stage.out_channels
        self.stages = nn.ModuleList(layers)
        self.head = conv_bn(cin, fc_channels, 1, relu=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(fc_channels, num_classes)
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of NCHW images."""
        x = self.stem(x)
        downsampled: list[list[torch.Tensor]] = []
        for stage, sources in zip(self.stages, self.fusion_sources):
            x, copies = stage(x, [downsampled[j][level] for j, level in sources])
            downsampled.append(copies)
        x = self.pool(self.head(x)).flatten(1)
        return self.classifier(self.dropout(x))
