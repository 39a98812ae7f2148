"""MobileNetV1 (Howard et al., 2017) with a width multiplier alpha."""

from __future__ import annotations

import torch
from torch import nn

from hatcli.nn_init import init_conv_bn_

# (output channels at alpha=1, stride) of the 13 depthwise-separable blocks
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU, the unit the quantizer folds and fuses."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNetV1: a 3x3 stem, 13 depthwise-separable blocks, global pooling and a classifier."""

    def __init__(self, num_classes: int, alpha: float = 1.0, stem_stride: int = 2,
                 block_strides: tuple[int, ...] | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        width = lambda c: max(8, int(c * alpha))  # noqa: E731
        strides = block_strides or tuple(s for _, s in BLOCKS)
        layers = [conv_bn_relu(3, width(32), 3, stem_stride)]
        cin = width(32)
        for (cout, _), stride in zip(BLOCKS, strides):
            cout = width(cout)
            layers.append(nn.Sequential(
                conv_bn_relu(cin, cin, 3, stride, groups=cin),  # depthwise
                conv_bn_relu(cin, cout, 1, 1),  # pointwise
            ))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(cin, num_classes)
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of NCHW images."""
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))
