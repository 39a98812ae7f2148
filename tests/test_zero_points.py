"""Every zero point is 0, on every grid (int8, uint8, int16, the int32 bias), whatever sets the
scales: the min/max, percentile or MSE observers at calibration, or scales learned in QAT (LSQ).
The BPU computes with symmetric grids only; so do int_infer and the artifact."""

from __future__ import annotations

import pytest
import torch
from torch.fx import GraphModule

from hatcli.quant.flow import convert_to_integer, prepare_quantized, set_mode
from hatcli.quant.observers import OBSERVERS
from hatcli.quant.march import load_march
from tiny_nets import MiniEfficientDet, TinyFamily

QD = torch.ops.quantized_decomposed
QDQ = {QD.quantize_per_tensor.default, QD.dequantize_per_tensor.default,
       QD.quantize_per_channel.default, QD.dequantize_per_channel.default}


class _DetFamily(TinyFamily):
    def build_float_model(self, config, num_classes):
        return MiniEfficientDet()


def _zero_points(program: GraphModule) -> dict[str, list[int]]:
    """Every quantize / dequantize node of `program` and the zero points it uses."""
    found = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in QDQ:
            continue
        zero = node.args[2]
        if isinstance(zero, torch.fx.Node):
            value = program
            for part in str(zero.target).split("."):
                value = getattr(value, part)
            zero = value
        found[f"{node.name} ({node.args[-1]})"] = torch.as_tensor(zero).reshape(-1).tolist()
    return found


def _program(march: str, observer: str, learned: bool, int16: list[str]) -> GraphModule:
    torch.manual_seed(0)
    prepared, _ = prepare_quantized(_DetFamily(), MiniEfficientDet().eval(), (16, 16), load_march(march), int16,
                                    observer=observer, percentile=99.0, activation_scales="learned" if learned else "frozen")
    gen = torch.Generator().manual_seed(1)
    set_mode(prepared, "calibrate")
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn(4, 3, 16, 16, generator=gen) + 0.5)  # off-centre data: a min/max grid would shift
    if learned:
        set_mode(prepared, "train")
        optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)
        for _ in range(3):
            cls, reg = prepared(torch.randn(4, 3, 16, 16, generator=gen) + 0.5)
            (cls.square().mean() + reg.mean()).backward()
            optimizer.step()
            optimizer.zero_grad()
    return convert_to_integer(prepared)


@pytest.mark.parametrize("learned", [False, True], ids=["calibrated", "learned (LSQ)"])
@pytest.mark.parametrize("observer", list(OBSERVERS))
@pytest.mark.parametrize(("march", "int16"), [("nash_e", ["stem*", "down*"]), ("host", [])])
def test_every_zero_point_is_zero(march: str, int16: list[str], observer: str, learned: bool):
    zero_points = _zero_points(_program(march, observer, learned, int16))
    assert len(zero_points) > 10
    nonzero = {name: zeros for name, zeros in zero_points.items() if any(zeros)}
    assert not nonzero, f"{observer} on {march}: {nonzero}"
    if int16:
        assert any("int16" in name for name in zero_points)
