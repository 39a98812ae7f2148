"""An int32 bias that its channel's scale cannot hold saturates (never wraps), is reported at
conversion (which layer, how many channels, by how much), and `hat check` lists it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from artifact_check import WEIGHT_FORMATS, _Family, compare_with_artifacts
from hatcli.deploy.bias_check import METADATA_KEY, bias_saturation, write_bias_records
from hatcli.deploy.export import export_onnx
from hatcli.errors import HatWarning
from hatcli.quant.bias_range import EIGHT_BIT_PRODUCT, INT32_MAX, bias_limit
from hatcli.quant.flow import convert_to_integer, export_program, prepare_quantized
from hatcli.quant.march import load_march
from tiny_nets import OpNet, calibrate


@pytest.mark.parametrize("fan_in", [1, 27, 36, 4608, 3 * 3 * 2048, 10**6])
def test_the_bias_range_is_float32_and_leaves_room_for_the_accumulator(fan_in: int):
    limit = bias_limit(fan_in)
    assert float(np.float32(limit)) == limit  # the quantize op clamps in float32: the end must be exact
    assert limit + fan_in * EIGHT_BIT_PRODUCT <= INT32_MAX or limit == 2**24
    assert limit >= 2**24  # a floor for layers so wide that any bias could overflow (none in practice)


def _dead_channel_net() -> nn.Module:
    """The review's case: BatchNorm with gamma ~ 0 on channel 0 (its folded weights, and so its
    weight scale, at the floor) and a bias of 20."""
    torch.manual_seed(0)
    op = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    with torch.no_grad():
        op[1].weight[0] = 1e-20
        op[1].bias[0] = 20.0
    return OpNet(op).eval()


@pytest.fixture(scope="module")
def dead_channel(tmp_path_factory):
    """(integer program, the warnings its conversion gave, the exported ONNX path)."""
    net = _dead_channel_net()
    prepared, _ = prepare_quantized(_Family(net), net, (8, 8), load_march("nash_e"), [])
    calibrate(prepared, [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))])
    with pytest.warns(HatWarning) as caught:
        integer = convert_to_integer(prepared)
    folder = tmp_path_factory.mktemp("bias")
    example = (torch.randn(2, 3, 8, 8),)
    export_onnx(export_program(integer, example), example, folder / "model.onnx", ["out"])
    write_bias_records(str(folder / "model.onnx"), integer.bias_saturation)
    return integer, [str(w.message) for w in caught], folder / "model.onnx"


def _biases(integer) -> list[torch.Tensor]:
    found = []
    for node in integer.graph.nodes:
        if node.op == "call_function" and "conv2d" in str(node.target) and len(node.args) > 2 and node.args[2] is not None:
            found.append(getattr(integer, node.args[2].args[0].target))
    return found


def test_a_saturating_bias_is_held_at_the_end_of_its_range_not_wrapped(dead_channel):
    integer, _, _ = dead_channel
    bias = _biases(integer)[-1]
    assert int(bias[0]) == bias_limit(4 * 9)  # positive, like the float bias of 20
    assert int(bias.min()) > -(2**31)


def test_conversion_warns_which_layer_how_many_channels_and_by_how_much(dead_channel):
    integer, warnings, _ = dead_channel
    record, = integer.bias_saturation
    assert (record.layer, record.channels, record.of, record.worst_channel, record.bias) == ("op.0", 1, 4, 0, 20.0)
    assert 0 < record.kept < 20.0
    assert any(w.startswith("op.0: int32 bias saturates on 1 of 4 channels (channel 0: bias 20 needs") for w in warnings)


def test_hat_check_lists_the_saturated_bias(dead_channel, hat):
    *_, path = dead_channel
    result = hat("check", "--model", path, "--march", "nash_e", "--json")
    listed = result.json()["bias_saturation"]
    assert [(r["layer"], r["channels"], r["bias"]) for r in listed] == [("op.0", 1, 20.0)]
    assert "saturated bias op.0: int32 bias saturates on 1 of 4 channels" in hat("check", "--model", path, "--march", "nash_e").out


def test_a_model_without_the_record_is_read_from_its_integers(dead_channel, tmp_path: Path):
    """An ONNX exported elsewhere has no record: the bias at the end of its range is found, and so
    is the -2^31 an int32 cast of 2^31 gives (what exports made before this fix carry)."""
    *_, path = dead_channel
    model = onnx.load(str(path))
    del model.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(model, str(plain))
    record, = bias_saturation(onnx.load(str(plain)))
    assert (record.channels, record.worst_channel, record.bias) == (1, 0, None)
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.INT32 and tensor.dims == [4]:
            values = onnx.numpy_helper.to_array(tensor).copy()
            if values[0] == bias_limit(36):
                values[0] = -(2**31)
                tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    onnx.save(model, str(tmp_path / "wrapped.onnx"))
    record, = bias_saturation(onnx.load(str(tmp_path / "wrapped.onnx")))
    assert record.kept < 0
    assert METADATA_KEY not in json.dumps([p.key for p in model.metadata_props])


def test_the_saturated_layer_still_computes_the_same_integers_in_the_artifact():
    with pytest.warns(HatWarning, match="int32 bias saturates"):
        comparison = compare_with_artifacts(_dead_channel_net(), "nash_e", weights=tuple(WEIGHT_FORMATS))
    assert not comparison.disagreements, "\n".join(map(str, comparison.disagreements))
