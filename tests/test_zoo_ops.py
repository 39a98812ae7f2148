"""The blocks of the architectures users bring (bench/zoo_ops.py measures the whole networks): a
squeeze-excite block, a ShuffleNet channel shuffle, a Swin block (LayerNorm, shifted-window
attention with matmuls of two activations and softmax, roll, GELU MLP). Each goes through
prepare, calibration, the integer program, export and compile at every level, and the artifact
returns exactly what `int_infer` returns; `hat check` names what does not run on the march."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from artifact_check import WEIGHT_FORMATS, compare_with_artifacts
from hatcli.deploy.check import FALLBACK, check_model
from hatcli.deploy.cpu import exact_u8s8
from hatcli.quant.march import load_march

WEIGHTS = ("uint8", "int8") if exact_u8s8() else ("uint8",)
assert set(WEIGHTS) <= set(WEIGHT_FORMATS)


class SqueezeExcite(nn.Module):
    """MobileNetV3 / EfficientNet: conv + BN + act, then global pool -> conv -> act -> conv -> gate -> mul."""

    def __init__(self, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), act())
        self.reduce, self.expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.act, self.gate = act(), gate()
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.stem(x))
        s = self.gate(self.expand(self.act(self.reduce(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y * s, 1), 1))


class ChannelShuffle(nn.Module):
    """ShuffleNetV2: split, a branch of 1x1 / depthwise / 1x1 convs, cat, shuffle (view / transpose / view)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                    nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4),
                                    nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        a, b = y.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.grouped(y)), 1), 1))


class TinySwin(nn.Module):
    """torchvision's own Swin block, shifted windows (roll + mask) and not: patch conv, permute to
    channels last, two `SwinTransformerBlock`s, LayerNorm, pool, linear."""

    def __init__(self, dim: int = 8) -> None:
        from torchvision.models.swin_transformer import SwinTransformerBlock

        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, dim, 2, 2)
        self.norm0 = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(
            SwinTransformerBlock(dim, 2, [4, 4], [0, 0], stochastic_depth_prob=0.1),
            SwinTransformerBlock(dim, 2, [4, 4], [2, 2], stochastic_depth_prob=0.1))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(self.norm0(self.patch(x).permute(0, 2, 3, 1)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.norm(y).permute(0, 3, 1, 2), 1), 1))


FAST = {"opts": (0, 3), "weights": WEIGHTS[:1]}
"""The default run compiles at two levels in one weight format; `pytest -m slow` at every level in both."""
FULL = {"weights": WEIGHTS}


def _case(*values, slow: bool = False):
    return pytest.param(*values, FULL if slow else FAST, marks=pytest.mark.slow if slow else ())


def _kinds(comparison) -> collections.Counter:
    return collections.Counter(op.split()[0] for op in comparison.integer_ops)


def _fallbacks(net: nn.Module, march: str, size: tuple[int, int]) -> list[str]:
    """`hat check`'s CPU fallbacks (op: reason) for the exported network."""
    with tempfile.TemporaryDirectory() as where:
        compare_with_artifacts(net, march, size=size, opts=(0,), weights=("uint8",), folder=Path(where))
        report = check_model(Path(where) / "model.onnx", load_march(march), input_shape=[1, 3, *size])
    return [f"{r.op_type}: {r.reason}" for r in report.rows if r.status == FALLBACK]


@pytest.mark.parametrize(("march", "act", "gate", "grid"), [
    _case("nash_e", nn.Hardswish, nn.Hardsigmoid), _case("host", nn.SiLU, nn.Sigmoid),
    _case("nash_e", nn.SiLU, nn.Sigmoid, slow=True), _case("host", nn.Hardswish, nn.Hardsigmoid, slow=True),
    _case("bayes_e", nn.SiLU, nn.Sigmoid, slow=True), _case("bernoulli2", nn.Hardswish, nn.Hardsigmoid, slow=True)])
def test_a_squeeze_excite_block_is_bit_identical(march, act, gate, grid):
    comparison = compare_with_artifacts(SqueezeExcite(act, gate), march, size=(8, 8), **grid)
    assert not comparison.disagreements, "\n".join(map(str, comparison.disagreements))
    kinds = _kinds(comparison)
    assert kinds["conv2d"] == 4 and kinds["mul"] >= 1 and kinds["table"] >= 3 and kinds["global_avg_pool"] == 2


@pytest.mark.parametrize(("march", "grid"), [_case("nash_e"), _case("bernoulli2", slow=True), _case("host", slow=True)])
def test_a_channel_shuffle_block_is_bit_identical(march, grid):
    comparison = compare_with_artifacts(ChannelShuffle(), march, size=(8, 8), **grid)
    assert not comparison.disagreements, "\n".join(map(str, comparison.disagreements))
    assert _kinds(comparison)["conv2d"] == 5


@pytest.mark.parametrize(("march", "grid"), [_case("nash_e"), _case("host", slow=True), _case("bayes_e", slow=True),
                                             _case("bernoulli2", slow=True)])
def test_a_swin_block_is_integer_and_bit_identical(march, grid, tmp_path):
    comparison = compare_with_artifacts(TinySwin(), march, size=(16, 16), folder=tmp_path, **grid)
    assert not comparison.disagreements, "\n".join(map(str, comparison.disagreements))
    kinds = _kinds(comparison)
    assert kinds["layer_norm"] == 6 and kinds["softmax"] == 2 and kinds["matmul"] == 4, dict(kinds)
    assert kinds["table"] >= 2 and kinds["linear"] == 9  # GELU; qkv, proj, 2 MLP layers per block, the head
    report = check_model(tmp_path / "model.onnx", load_march(march), input_shape=[1, 3, 16, 16])
    unsupported = {r.op_type for r in report.rows if r.status == FALLBACK}
    assert unsupported <= {"Softmax", "LayerNormalization", "Gelu", "Gather", "Transpose"}, unsupported
    if march.startswith("nash"):
        assert not unsupported


@pytest.mark.slow
def test_hat_check_names_what_a_swin_block_runs_on_the_cpu():
    """nash_e runs every op of the block on the BPU; bernoulli2 has no Softmax, LayerNorm or GELU."""
    assert _fallbacks(TinySwin(), "nash_e", (16, 16)) == []
    fallbacks = _fallbacks(TinySwin(), "bernoulli2", (16, 16))
    ops = {line.split(":")[0] for line in fallbacks}
    assert {"Softmax", "LayerNormalization", "Gelu"} <= ops, fallbacks
    assert all("not supported on bernoulli2" in line for line in fallbacks if line.startswith("Softmax"))
