"""MobileNetV2 (Sandler et al., 2018) with a width multiplier alpha: torchvision's architecture,
module names and parameter count (3,504,872 at alpha 1.0 with 1000 classes)."""

from __future__ import annotations

import torch
from torch import nn

from hatcli.nn_init import init_conv_bn_

# (t, c, n, s) of the paper's table 2: expansion, output channels at alpha 1, repeats, first stride
SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
STRIDES: tuple[int, ...] = tuple(s if i == 0 else 1 for _, _, n, s in SETTING for i in range(n))
"""The default stride of each of the 17 inverted residual blocks (ImageNet's)."""
STEM_CHANNELS, LAST_CHANNELS = 32, 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """`value` rounded to the nearest multiple of `divisor` (at least `divisor`), never more than
    10% below `value`: torchvision's `_make_divisible`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU6 (a module, not in place): torchvision's `Conv2dNormActivation`."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=False),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion (when t > 1), 3x3 depthwise, linear 1x1 projection; the input is added back
    when the block keeps the shape (stride 1, same channels)."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [conv_bn_relu6(cin, hidden, 1)] if expand_ratio != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),  # linear bottleneck: no activation
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """Stem conv (`features.0`), 17 inverted residual blocks (`features.1` .. `features.17`), a 1x1
    conv to the last channels (`features.18`), global pooling, dropout and the classifier
    (`classifier.1`)."""

    def __init__(self, num_classes: int, alpha: float = 1.0, stem_stride: int = 2,
                 block_strides: tuple[int, ...] | None = None, dropout: float = 0.2) -> None:
        super().__init__()
        strides = tuple(block_strides) if block_strides is not None else STRIDES
        if len(strides) != len(STRIDES) or any(s not in (1, 2) for s in strides):
            raise ValueError(f"block_strides needs {len(STRIDES)} values, each 1 or 2, got {list(strides)}")
        cin = make_divisible(STEM_CHANNELS * alpha)
        last = make_divisible(LAST_CHANNELS * max(1.0, alpha))
        layers: list[nn.Module] = [conv_bn_relu6(3, cin, 3, stem_stride)]
        expansions = [t for t, _, n, _ in SETTING for _ in range(n)]
        widths = [make_divisible(c * alpha) for _, c, n, _ in SETTING for _ in range(n)]
        for t, cout, stride in zip(expansions, widths, strides):
            layers.append(InvertedResidual(cin, cout, stride, t))
            cin = cout
        layers.append(conv_bn_relu6(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
                                        nn.Linear(last, num_classes))
        init_conv_bn_(self)  # He-normal fan-out convs, identity BatchNorm, as torchvision
        nn.init.normal_(self.classifier[1].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of NCHW images."""
        x = self.pool(self.features(x)).flatten(1)
        dropout, linear = self.classifier
        # in eval mode (how hat exports) the graph holds no dropout: an `aten.dropout(train=False)`
        # between the pooled features and the Linear would get an observer of its own and requantize
        # the features onto a second, coarser grid
        return linear(dropout(x) if self.training else x)
