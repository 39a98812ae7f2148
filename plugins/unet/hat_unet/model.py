"""UNet: a small encoder-decoder for semantic segmentation, built from BPU-friendly ops only.

The network (Ronneberger et al., "U-Net", 2015, in the compact form embedded segmentation
benchmarks use) has `depth + 1` levels of widths `base, 2 base, 4 base, ...`:

- encoder: a stem of two 3x3 conv + BN + ReLU at full resolution, then per level a 3x3 / stride-2
  conv + BN + ReLU (the downsampling) and a 3x3 conv + BN + ReLU;
- context: at the bottleneck, a residual 3x3 conv of dilation `dilation` + BN, added to its input,
  then ReLU (`dilation = 1`: no context block) -- it widens the receptive field without another
  downsampling;
- decoder: per level, x2 upsampling (`nearest` or `bilinear`, half-pixel centres) to the size of
  the encoder feature of that level, concatenation with it (the skip connection), and two 3x3
  conv + BN + ReLU down to that level's width; it stops at the level of `output_stride`;
- classifier: a 1x1 conv (with bias) to the class logits, at `output_stride` of the input.

Every op is one the quantizer annotates and the integer program computes exactly: conv (BN
folded, ReLU fused), add, concat (one shared scale), and nearest / bilinear resize (scale kept).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hatcli.nn_init import init_conv_bn_

UPSAMPLE_MODES = ("nearest", "bilinear")


def conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 conv (no bias, `dilation`, same padding) + BatchNorm + ReLU: the unit the quantizer
    folds and fuses into one integer conv."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def double_conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Two 3x3 conv + BN + ReLU; the first one strides (`stride` 2: a downsampling level)."""
    return nn.Sequential(conv_bn_relu(cin, cout, stride), conv_bn_relu(cout, cout))


class ContextBlock(nn.Module):
    """`relu(x + bn(conv3x3_dilated(x)))`: a residual dilated conv at the bottleneck."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output (same shape as `x`)."""
        return self.relu(x + self.bn(self.conv(x)))


class UpBlock(nn.Module):
    """Upsample the coarser feature to the skip's size, concatenate the skip, two 3x3 convs."""

    def __init__(self, cin: int, skip_channels: int, cout: int, mode: str) -> None:
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}, got {mode!r}")
        self.mode = mode
        self.fuse = double_conv(cin + skip_channels, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Fuse the coarser feature `x` into the finer encoder feature `skip`."""
        # align_corners=False: half-pixel centres, what ONNX Resize and the integer kernel compute
        options = {"align_corners": False} if self.mode == "bilinear" else {}
        up = F.interpolate(x, size=skip.shape[-2:], mode=self.mode, **options)
        return self.fuse(torch.cat([up, skip], 1))


class UNet(nn.Module):
    """The UNet of the module docstring; forward returns logits [N, num_classes, H/s, W/s]."""

    def __init__(self, num_classes: int, base_channels: int = 16, depth: int = 3, dilation: int = 2,
                 upsample: str = "nearest", output_stride: int = 1) -> None:
        super().__init__()
        stop = int(math.log2(output_stride))
        if 2 ** stop != output_stride or not 0 <= stop <= depth:
            raise ValueError(f"output_stride must be a power of 2 up to 2**depth = {2 ** depth}, got {output_stride}")
        widths = [base_channels * 2 ** level for level in range(depth + 1)]
        self.widths = widths
        self.stem = double_conv(3, widths[0])
        self.down = nn.ModuleList(double_conv(widths[i], widths[i + 1], stride=2) for i in range(depth))
        self.context = ContextBlock(widths[-1], dilation) if dilation > 1 else nn.Identity()
        # decoder levels from the coarsest up; up[k] lands on level depth - 1 - k
        self.up = nn.ModuleList(UpBlock(widths[i + 1], widths[i], widths[i], upsample)
                                for i in reversed(range(stop, depth)))
        self.classifier = nn.Conv2d(widths[stop], num_classes, 1)
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits at `output_stride` of the input, for images (N, 3, H, W)."""
        features = [self.stem(x)]
        for down in self.down:
            features.append(down(features[-1]))
        y = self.context(features.pop())
        for up in self.up:
            y = up(y, features.pop())
        return self.classifier(y)
