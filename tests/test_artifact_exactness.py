"""The compiled artifact computes exactly what `int_infer` computes: every op pattern the docs call
integer, on every march, at every `--opt` level, in both weight formats, returns the same values.

Each pattern sits between a signed conv stem and a flatten (`tiny_nets.OpNet`), so its output
grid is the graph's output; `artifact_check.compare_with_artifacts` quantizes, calibrates,
converts, exports and compiles it, and runs both programs on inputs that spread wide of the
calibration data (the saturating clamps must agree as well).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from artifact_check import compare_with_artifacts
from hatcli.deploy.cpu import exact_u8s8
from hatcli.quant.march import MARCH_NAMES
from tiny_nets import Fn, OpNet


def conv(cin: int = 4, cout: int = 4, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kwargs.pop("kernel", 3), padding=kwargs.pop("padding", 1), **kwargs)


def flat_linear(bias: bool = True) -> Fn:
    return Fn(lambda m, x: m.fc(torch.flatten(x, 1)), fc=nn.Linear(4 * 8 * 8, 6, bias=bias))


PATTERNS: dict[str, object] = {
    # weighted ops
    "conv": lambda: conv(),
    "conv_no_bias": lambda: conv(bias=False),
    "conv_1x1_stride_2": lambda: conv(kernel=1, padding=0, stride=2),
    "depthwise": lambda: nn.Sequential(conv(groups=4), nn.BatchNorm2d(4)),
    "grouped": lambda: conv(4, 8, groups=2),
    "linear": lambda: flat_linear(),
    "linear_no_bias": lambda: flat_linear(bias=False),
    # each fusable clamp, after a conv, a linear and an add
    "conv_relu": lambda: nn.Sequential(conv(), nn.BatchNorm2d(4), nn.ReLU()),
    "conv_relu6": lambda: nn.Sequential(conv(), nn.BatchNorm2d(4), nn.ReLU6()),
    "conv_hardtanh": lambda: nn.Sequential(conv(), nn.Hardtanh(-0.5, 0.75)),
    "conv_clamp": lambda: Fn(lambda m, x: torch.clamp(m.c(x), 0.0, 0.6), c=conv()),
    "conv_clamp_min": lambda: Fn(lambda m, x: torch.clamp_min(m.c(x), -0.2), c=conv()),
    "linear_relu": lambda: Fn(lambda m, x: torch.relu(m.fc(torch.flatten(x, 1))), fc=nn.Linear(256, 6)),
    "linear_relu6": lambda: Fn(lambda m, x: F.relu6(m.fc(torch.flatten(x, 1))), fc=nn.Linear(256, 6)),
    "add_relu": lambda: Fn(lambda m, x: torch.relu(m.a(x) + x), a=conv()),
    "add_relu6": lambda: Fn(lambda m, x: F.relu6(m.a(x) + x), a=conv()),
    "add_hardtanh": lambda: Fn(lambda m, x: F.hardtanh(m.a(x) + x, -0.4, 0.4), a=conv()),
    # elementwise arithmetic, concatenation
    "add": lambda: Fn(lambda m, x: m.a(x) + m.b(x), a=conv(), b=conv()),
    "sub": lambda: Fn(lambda m, x: m.a(x) - x, a=conv()),
    "mul": lambda: Fn(lambda m, x: x * torch.sigmoid(m.a(x)), a=conv()),
    "cat_different_scales": lambda: Fn(lambda m, x: torch.cat([m.a(x), 3 * x], 1), a=conv()),
    "cat_mixed_grids": lambda: Fn(lambda m, x: torch.cat([torch.relu(m.a(x)), x], 1), a=conv()),
    # pooling, resizing
    "max_pool": lambda: nn.MaxPool2d(3, 2, 1),
    "global_avg_pool": lambda: nn.AdaptiveAvgPool2d(1),
    "mean_keepdim": lambda: Fn(lambda m, x: x.mean((2, 3), keepdim=True)),
    "resize_nearest_x2": lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=2, mode="nearest")),
    "resize_nearest_x3": lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=3, mode="nearest")),
    "resize_bilinear_x2": lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear")),
    # look-up tables
    "sigmoid": lambda: Fn(lambda m, x: torch.sigmoid(F.max_pool2d(x, 2))),
    "tanh": lambda: Fn(lambda m, x: torch.tanh(F.max_pool2d(x, 2))),
    "hardswish": lambda: Fn(lambda m, x: F.hardswish(F.max_pool2d(x, 2))),
    "silu": lambda: Fn(lambda m, x: F.silu(F.max_pool2d(x, 2))),
    "relu6_alone": lambda: Fn(lambda m, x: F.relu6(F.max_pool2d(x, 2))),
    # a conv whose (clamped) result is the graph's output: the dequantized accumulator
    "output_conv": lambda: conv(),
    "output_conv_relu": lambda: Fn(lambda m, x: torch.relu(m.c(x)), c=conv()),
}

WEIGHTS = ("uint8", "int8") if exact_u8s8() else ("uint8",)


class _OutputConv(nn.Module):
    """The pattern as the last layer: the graph's output is its (float) result, not a flatten of it."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.stem(x))


def _network(name: str) -> nn.Module:
    op = PATTERNS[name]()
    return _OutputConv(op) if name.startswith("output_conv") else OpNet(op)


@pytest.mark.parametrize("march", MARCH_NAMES)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_the_artifact_returns_what_int_infer_returns(pattern: str, march: str):
    comparison = compare_with_artifacts(_network(pattern), march, weights=WEIGHTS)
    assert not comparison.disagreements, "\n".join(map(str, comparison.disagreements))


@pytest.mark.parametrize("activation", ["relu6", "hardtanh", "clamp"])
def test_a_conv_bn_clamp_network_is_bit_identical_at_every_level(activation: str):
    """The review's case: three 64-channel conv + BN + clamp layers for nash_e. Before the clamp
    table was shared, int_infer left ReLU6 / hardtanh / clamp convs in float and 0.3-0.8 % of the
    outputs differed; now every conv is integer on both sides."""
    make = {"relu6": nn.ReLU6, "hardtanh": lambda: nn.Hardtanh(-1.5, 2.0),
            "clamp": lambda: Fn(lambda m, x: torch.clamp(x, 0.0, 3.0))}[activation]
    torch.manual_seed(0)
    layers, channels = [], 3
    for _ in range(3):
        layers += [nn.Conv2d(channels, 64, 3, padding=1), nn.BatchNorm2d(64), make()]
        channels = 64
    net = nn.Sequential(*layers, nn.Conv2d(64, 4, 1))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2)
    comparison = compare_with_artifacts(net, "nash_e", size=(16, 16), weights=WEIGHTS)
    assert [op.split()[0] for op in comparison.integer_ops].count("conv2d") == 4
    assert not comparison.disagreements, "\n".join(map(str, comparison.disagreements))
