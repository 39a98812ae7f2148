"""The compiled artifact computes exactly what `int_infer` computes: every op pattern the docs call
integer, on every march, at every `--opt` level, in both weight formats, returns the same values
(the default run: each pattern on two marches, every march covered; `pytest -m slow`: all of them).

Each pattern sits between a signed conv stem and a flatten (`tiny_nets.OpNet`), so its output
grid is the graph's output; `artifact_check.compare_with_artifacts` quantizes, calibrates,
converts, exports and compiles it, and runs both programs on inputs that spread wide of the
calibration data (the saturating clamps must agree as well).
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from artifact_check import compare_with_artifacts
from hatcli.deploy.cpu import exact_u8s8
from hatcli.quant.march import SHIPPED_MARCHES as MARCH_NAMES, load_march
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
    "conv1d": lambda: Fn(lambda m, x: torch.relu(m.c(x.flatten(2))), c=nn.Conv1d(4, 4, 3, padding=1)),
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
    "mul": lambda: Fn(lambda m, x: x * m.a(x), a=conv()),
    "mul_gate": lambda: Fn(lambda m, x: x * torch.sigmoid(F.max_pool2d(m.a(x), 3, 1, 1)), a=conv()),
    "cat_different_scales": lambda: Fn(lambda m, x: torch.cat([m.a(x), 3 * x], 1), a=conv()),
    "cat_mixed_grids": lambda: Fn(lambda m, x: torch.cat([torch.relu(m.a(x)), x], 1), a=conv()),
    # pooling, resizing
    "max_pool": lambda: nn.MaxPool2d(3, 2, 1),
    "avg_pool_2": lambda: nn.AvgPool2d(2),
    "avg_pool_3_stride_2_padded": lambda: nn.AvgPool2d(3, 2, 1),
    "avg_pool_padding_not_counted": lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False),
    "avg_pool_ceil_mode": lambda: nn.AvgPool2d(3, 2, 0, ceil_mode=True),
    "avg_pool_ceil_mode_not_counted": lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
    "global_avg_pool": lambda: nn.AdaptiveAvgPool2d(1),
    "mean_keepdim": lambda: Fn(lambda m, x: x.mean((2, 3), keepdim=True)),
    "resize_nearest_x2": lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=2, mode="nearest")),
    "resize_nearest_x3": lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=3, mode="nearest")),
    "resize_nearest_to_12": lambda: Fn(lambda m, x: F.interpolate(x, size=(12, 12), mode="nearest")),
    "resize_bilinear_x2": lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear")),
    "resize_bilinear_x4": lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=4, mode="bilinear")),
    "resize_bilinear_x3": lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=3, mode="bilinear")),
    "resize_bilinear_to_12": lambda: Fn(lambda m, x: F.interpolate(x, size=(12, 12), mode="bilinear")),
    "resize_bilinear_align_corners": lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear",
                                                                         align_corners=True)),
    # look-up tables
    "sigmoid": lambda: Fn(lambda m, x: torch.sigmoid(F.max_pool2d(x, 2))),
    "tanh": lambda: Fn(lambda m, x: torch.tanh(F.max_pool2d(x, 2))),
    "hardswish": lambda: Fn(lambda m, x: F.hardswish(F.max_pool2d(x, 2))),
    "silu": lambda: Fn(lambda m, x: F.silu(F.max_pool2d(x, 2))),
    "relu6_alone": lambda: Fn(lambda m, x: F.relu6(F.max_pool2d(x, 2))),
    # zoo ops (bench/zoo_ops.py): fused tables, GELU, attention, norms, data movement
    "conv_silu": lambda: Fn(lambda m, x: F.silu(m.c(x)), c=conv()),
    "conv_sigmoid": lambda: Fn(lambda m, x: torch.sigmoid(m.c(x)), c=conv()),
    "conv_hardswish": lambda: nn.Sequential(conv(), nn.BatchNorm2d(4), nn.Hardswish()),
    "conv_hardsigmoid": lambda: nn.Sequential(conv(), nn.Hardsigmoid()),
    "conv_hardswish_inplace": lambda: nn.Sequential(conv(), nn.BatchNorm2d(4), nn.Hardswish(inplace=True)),
    "linear_gelu": lambda: Fn(lambda m, x: F.gelu(m.fc(torch.flatten(x, 1))), fc=nn.Linear(256, 6)),
    "gelu": lambda: Fn(lambda m, x: F.gelu(F.max_pool2d(x, 2))),
    "gelu_tanh": lambda: Fn(lambda m, x: F.gelu(F.max_pool2d(x, 2), approximate="tanh")),
    "matmul": lambda: Fn(lambda m, x: torch.matmul(m.a(x), x.transpose(-1, -2)), a=conv()),
    "softmax": lambda: Fn(lambda m, x: torch.softmax(m.a(x), -1), a=conv()),
    "layer_norm": lambda: nn.LayerNorm(8),
    "layer_norm_channels_last": lambda: Fn(lambda m, x: m.n(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
                                           n=nn.LayerNorm(4)),
    "add_constant": lambda: Fn(lambda m, x: m.a(x) + m.c.weight[:, :1].reshape(1, 4, 3, 3).repeat(1, 1, 3, 3)[..., :8, :8],
                               a=conv(), c=nn.Conv2d(4, 4, 3)),
    "roll": lambda: Fn(lambda m, x: torch.roll(x, (3, -2), (2, 3))),
    "channel_shuffle": lambda: Fn(lambda m, x: x.view(-1, 2, 2, 8, 8).transpose(1, 2).reshape(-1, 4, 8, 8)),
    # int16 layers (`INT16` names the modules): int16 in, int16 out, both
    "int16_conv_in": lambda: nn.Sequential(conv(), conv()),
    "int16_conv_out": lambda: conv(),
    "int16_conv_relu_in_and_out": lambda: nn.Sequential(conv(), nn.ReLU(), conv(), nn.ReLU()),
    "int16_linear_in": lambda: Fn(lambda m, x: m.fc(torch.flatten(m.c(x), 1)), c=conv(), fc=nn.Linear(256, 6)),
    "int16_add": lambda: Fn(lambda m, x: m.a(x) + x, a=conv()),
    "int16_mul": lambda: Fn(lambda m, x: x * torch.sigmoid(F.max_pool2d(x, 1))),
    "int16_sigmoid": lambda: Fn(lambda m, x: torch.sigmoid(F.max_pool2d(x, 2))),
    "int16_table_in": lambda: Fn(lambda m, x: torch.tanh(F.max_pool2d(m.c(x), 2)), c=conv()),
    "int16_avg_pool_in": lambda: Fn(lambda m, x: F.avg_pool2d(m.c(x), 3, 2, 1), c=conv()),
    "int16_mul_in": lambda: Fn(lambda m, x: m.c(x) * torch.sigmoid(F.max_pool2d(m.c(x), 3, 1, 1)), c=conv()),
    # a conv whose (clamped) result is the graph's output: the dequantized accumulator
    "output_conv": lambda: conv(),
    "output_conv_relu": lambda: Fn(lambda m, x: torch.relu(m.c(x)), c=conv()),
    "output_conv1d": lambda: Fn(lambda m, x: m.c(x.flatten(2)), c=nn.Conv1d(4, 4, 3, padding=1)),
    "output_linear": lambda: Fn(lambda m, x: m.fc(x.mean((2, 3))), fc=nn.Linear(4, 5)),
}

WEIGHTS = ("uint8", "int8") if exact_u8s8() else ("uint8",)
INT16: dict[str, tuple[str, ...]] = {
    "int16_conv_in": ("op.0",), "int16_conv_out": ("op",), "int16_conv_relu_in_and_out": ("op.0", "op.1", "op.2"),
    "int16_linear_in": ("op.c",), "int16_add": ("op", "op.a"), "int16_mul": ("op",), "int16_sigmoid": ("op",),
    "int16_table_in": ("op.c",), "int16_mul_in": ("op.c",), "int16_avg_pool_in": ("op.c",),
}
"""The modules each int16 pattern computes in int16 (`quant.int16`), on the marches that have int16."""

_CONV, _LINEAR = {"conv2d": 1}, {"linear": 1}
INTEGER_OPS: dict[str, dict[str, int]] = {
    **{name: _CONV for name in ("conv", "conv_no_bias", "conv_1x1_stride_2", "depthwise", "grouped", "conv_relu",
                                "conv_relu6", "conv_hardtanh", "conv_clamp", "conv_clamp_min", "output_conv",
                                "output_conv_relu")},
    "conv1d": {"conv1d": 1}, "output_conv1d": {"conv1d": 1}, "output_linear": {"linear": 1},
    **{name: _LINEAR for name in ("linear", "linear_no_bias", "linear_relu", "linear_relu6")},
    **{name: {"add": 1} for name in ("add_relu", "add_relu6", "add_hardtanh", "add")},
    "sub": {"sub": 1}, "mul": {"mul": 1}, "mul_gate": {"mul": 1, "table": 1},
    **{name: {"avg_pool": 1} for name in PATTERNS if name.startswith("avg_pool")},
    "global_avg_pool": {"global_avg_pool": 1}, "mean_keepdim": {"global_avg_pool": 1},
    **{name: {"resample": 1} for name in PATTERNS if name.startswith("resize_bilinear")},
    **{name: {"table": 1} for name in ("sigmoid", "tanh", "hardswish", "relu6_alone")},
    "silu": {"table": 1, "mul": 1},
    **{name: {"conv2d": 1, "table": 1} for name in ("conv_silu", "conv_sigmoid", "conv_hardswish", "conv_hardsigmoid",
                                                        "conv_hardswish_inplace")},
    "linear_gelu": {"linear": 1, "table": 1}, "gelu": {"table": 1}, "gelu_tanh": {"table": 1},
    "matmul": {"conv2d": 1, "matmul": 1}, "softmax": {"conv2d": 1, "softmax": 1},
    "layer_norm": {"layer_norm": 1}, "layer_norm_channels_last": {"layer_norm": 1},
    "add_constant": {"conv2d": 1, "add": 1},
    "int16_conv_in": {"conv2d": 2}, "int16_conv_out": _CONV, "int16_conv_relu_in_and_out": {"conv2d": 2},
    "int16_linear_in": {"conv2d": 1, "linear": 1}, "int16_add": {"add": 1}, "int16_sigmoid": {"table": 1},
    "int16_table_in": {"table": 1}, "int16_mul_in": {"mul": 1, "table": 1}, "int16_avg_pool_in": {"avg_pool": 1},
}
"""What `int_infer` must compute in integers for each pattern (besides the input quantize and the
stem conv); the patterns not listed move or select integers (max pool, cat, nearest resize)."""


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
    return _OutputConv(op) if name.startswith("output_") else OpNet(op)


DEFAULT_MARCHES_PER_PATTERN = 2


def _grid() -> list:
    """Every pattern on every march that can hold it. The default run takes each pattern on
    `DEFAULT_MARCHES_PER_PATTERN` of them, rotated through the pattern list so that every march
    gets its share of patterns; the rest of the grid is marked `slow` (`pytest -m slow` runs it,
    and the whole grid agrees there too)."""
    cases = []
    for number, pattern in enumerate(PATTERNS):
        marches = [m for m in MARCH_NAMES if pattern not in INT16 or load_march(m).quant.allow_int16]
        step = max(1, len(marches) // DEFAULT_MARCHES_PER_PATTERN)
        chosen = {marches[(number + k * step) % len(marches)] for k in range(DEFAULT_MARCHES_PER_PATTERN)}
        cases += [pytest.param(pattern, march, marks=() if march in chosen else pytest.mark.slow)
                  for march in marches]
    return cases


GRID = _grid()


@pytest.mark.parametrize(("pattern", "march"), GRID)
def test_the_artifact_returns_what_int_infer_returns(pattern: str, march: str):
    comparison = compare_with_artifacts(_network(pattern), march, int16=INT16.get(pattern, ()), weights=WEIGHTS)
    assert not comparison.disagreements, "\n".join(map(str, comparison.disagreements))
    kinds = collections.Counter(op.split()[0] for op in comparison.integer_ops)
    kinds["conv2d"] -= 1  # the stem
    for kind, count in INTEGER_OPS.get(pattern, {}).items():
        assert kinds[kind] >= count, f"{pattern} on {march}: expected {count} integer {kind}, int_infer has {dict(kinds)}"


class _InvertedResidual(nn.Module):
    """A MobileNetV2 block: 1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN,
    and the residual add."""

    def __init__(self, channels: int = 8, expand: int = 6) -> None:
        super().__init__()
        hidden = channels * expand
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU6())
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.block(y)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("march", MARCH_NAMES)
def test_a_mobilenet_v2_block_is_bit_identical_at_every_level(march: str):
    torch.manual_seed(0)
    net = _InvertedResidual()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2)
    comparison = compare_with_artifacts(net, march, size=(16, 16), weights=WEIGHTS)
    kinds = collections.Counter(op.split()[0] for op in comparison.integer_ops)
    assert (kinds["conv2d"], kinds["add"], kinds["global_avg_pool"], kinds["linear"]) == (4, 1, 1, 1)
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
