"""BiFPN neck with sum fusion (HAT's `BiFPN(fpn_name="bifpn_sum")`, Tan et al. 2020 without weights).

It takes the backbone's stride-8, 16 and 32 features, projects them to `channels` with 1x1 conv
+ BN, and builds two extra levels (strides 64 and 128) from the stride-32 feature: a 1x1 conv +
BN, then 3x3 / stride-2 max pooling, and max pooling again. `layers` BiFPN layers follow; each
fuses by plain sums (no learned fusion weights: every input has weight 1, which keeps the graph a
chain of integer adds), top-down with nearest x2 upsampling, then bottom-up with 3x3 / stride-2
max pooling, and follows every sum by a (separable) 3x3 conv + BN + ReLU. The outputs are five
maps of `channels` channels at strides 8, 16, 32, 64, 128.

Upsampling goes to the exact size of the finer map, so any input size works; sizes divisible by
128 give exact halvings at every level (the usual case: 512 x 512).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hat_fcos_efficientnet.backbone import conv_bn

NUM_LEVELS = 5
OUT_STRIDES = (8, 16, 32, 64, 128)


def fusion_conv(channels: int, separable: bool) -> nn.Sequential:
    """What follows each fused sum: depthwise 3x3 + BN then 1x1 + BN + ReLU, or a plain 3x3 + BN + ReLU."""
    if not separable:
        return conv_bn(channels, channels, 3)
    return nn.Sequential(conv_bn(channels, channels, 3, groups=channels, relu=False), conv_bn(channels, channels, 1))


def downsample(x: torch.Tensor) -> torch.Tensor:
    """Halve the resolution with 3x3 / stride-2 max pooling (scale-preserving when quantized)."""
    return F.max_pool2d(x, 3, 2, 1)


def upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Nearest upsampling of `x` to the spatial size of `like` (x2 for sizes divisible by 128)."""
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")


class BiFPNLayer(nn.Module):
    """One bidirectional fusion layer over five levels (index 0 is stride 8)."""

    def __init__(self, channels: int, separable: bool) -> None:
        super().__init__()
        self.top_down = nn.ModuleList(fusion_conv(channels, separable) for _ in range(NUM_LEVELS - 1))
        self.bottom_up = nn.ModuleList(fusion_conv(channels, separable) for _ in range(NUM_LEVELS - 1))

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fuse top-down then bottom-up; return the five new maps."""
        td = [None] * NUM_LEVELS
        td[-1] = inputs[-1]
        for i in range(NUM_LEVELS - 2, -1, -1):
            td[i] = self.top_down[i](inputs[i] + upsample_to(td[i + 1], inputs[i]))
        out = [td[0]]
        for i in range(1, NUM_LEVELS):
            fused = inputs[i] + downsample(out[-1])
            if i < NUM_LEVELS - 1:
                fused = fused + td[i]  # the intermediate top-down node of the same level
            out.append(self.bottom_up[i - 1](fused))
        return out


class BiFPN(nn.Module):
    """Lateral projections, the two extra levels and `layers` stacked `BiFPNLayer`s."""

    def __init__(self, in_channels: list[int], channels: int = 64, layers: int = 3, separable: bool = True) -> None:
        super().__init__()
        c3, c4, c5 = in_channels[-3:]
        self.lateral = nn.ModuleList(conv_bn(c, channels, 1, relu=False) for c in (c3, c4, c5))
        self.extra = conv_bn(c5, channels, 1, relu=False)
        self.layers = nn.ModuleList(BiFPNLayer(channels, separable) for _ in range(layers))
        self.out_channels = channels
        self.out_strides = list(OUT_STRIDES)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Backbone features at strides (.., 8, 16, 32) -> five fused maps at strides 8 .. 128."""
        c3, c4, c5 = features[-3:]
        p6 = downsample(self.extra(c5))
        levels = [lateral(c) for lateral, c in zip(self.lateral, (c3, c4, c5))] + [p6, downsample(p6)]
        for layer in self.layers:
            levels = layer(levels)
        return levels
