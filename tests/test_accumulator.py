"""The accumulator model: a conv / linear accumulator saturates at the march's `accumulator_bits`
(32 on every bundled march), in int_infer and in the compiled artifact alike; an int16 layer that
can reach it is reported at conversion and by `hat check`. And what is not integer is said so."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from artifact_check import compare_with_artifacts
from hatcli.deploy.check import check_model
from hatcli.errors import HatWarning
from hatcli.quant.integer import integer_program
from hatcli.quant.integer_kernels import int_weighted
from hatcli.quant.march import load_march
from tiny_nets import OpNet
from test_artifact_exactness import WEIGHTS


def _linear(q_x: torch.Tensor, fan_in: int, bits: int) -> torch.Tensor:
    weights = torch.full((1, fan_in), 127, dtype=torch.int8)
    return int_weighted("linear", q_x, 0.5, 0, -32768, 32767, weights, torch.tensor([0.25]), None, (),
                        None, 0, 0, 0, None, None, bits)


def test_the_accumulator_saturates_at_its_width_and_never_wraps():
    q_x = torch.full((2, 1024), 32767, dtype=torch.int16)
    q_x[1] = -32768
    exact = 32767 * 127 * 1024  # 4.26e9: past int32
    product = torch.tensor(0.5) * torch.tensor(0.25)
    saturated = _linear(q_x, 1024, 32)
    assert saturated[0, 0] == torch.tensor(float(2**31 - 1)) * product
    assert saturated[1, 0] == torch.tensor(float(-(2**31))) * product
    assert _linear(q_x, 1024, 48)[0, 0] == torch.tensor(float(exact)) * product


def _wide_int16_net() -> nn.Module:
    """A near-constant int16 ReLU tensor read by a 3x3 conv over 256 channels of all-positive
    weights whose result is the graph's (float) output: its accumulator passes 2^31."""
    torch.manual_seed(0)
    op = nn.Sequential(nn.Conv2d(4, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 4, 3, padding=1))
    with torch.no_grad():
        op[0].weight.mul_(0.01)
        op[0].bias.fill_(1.0)
        op[2].weight.uniform_(0.5, 1.0)
    return OpNet(op)


def test_an_int16_layer_that_can_pass_the_accumulator_is_reported_and_both_sides_saturate_alike(tmp_path: Path):
    with pytest.warns(HatWarning, match=r"op\.2: the int16 x int8 accumulator \(fan-in 2304\) can reach"):
        comparison = compare_with_artifacts(_wide_int16_net(), "nash_e", int16=("op.0", "op.1"), weights=WEIGHTS,
                                            folder=tmp_path)
    assert not comparison.disagreements, "\n".join(map(str, comparison.disagreements))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", HatWarning)  # the same report again
        wide = integer_program(comparison.reference, 64)(comparison.images)
        held = integer_program(comparison.reference, 32)(comparison.images)
    assert (wide != held).float().mean() > 0.5  # it does saturate, and the artifact saturated alike
    assert any("Clip" in ops for ops in comparison.compiled_ops.values())  # the saturation, in int64
    report = check_model(tmp_path / "model.onnx", load_march("nash_e"))
    overflow, = report.accumulator_overflow
    assert (overflow.layer, overflow.input_dtype, overflow.fan_in, overflow.bits) == ("op.2", "int16", 2304, 32)
    assert overflow.bound > 2**31


def test_an_activation_fused_after_a_conv_is_an_integer_table_on_both_sides(tmp_path: Path):
    """On nash_e a sigmoid after a conv is fused (no int8 tensor between): the exact accumulator is
    requantized onto an int16 grid and the sigmoid is a table, in int_infer and in the artifact
    alike, so they agree on every value and `hat check` has nothing to say about it."""
    net = OpNet(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Sigmoid()))
    comparison = compare_with_artifacts(net, "nash_e", weights=("uint8",), opts=(0, 3), folder=tmp_path)
    assert not comparison.disagreements, "\n".join(map(str, comparison.disagreements))
    rows = [r for r in check_model(tmp_path / "model.onnx", load_march("nash_e")).rows if r.fused == ["Sigmoid"]]
    assert rows and rows[0].status == "BPU" and rows[0].reason == ""
