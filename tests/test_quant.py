"""The march quantizer and the PT2E flow: what gets quantized, how, and that stages agree."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hat_mobilenet.family import MobileNetV1Config, MobileNetV1Family
from hatcli.errors import RecipeError
from hatcli.quant.flow import convert_to_integer, export_deploy_graph, prepare_quantized, set_mode
from hatcli.quant.march import load_march
from hatcli.quant.quantizer import MarchQuantizer

Q = torch.ops.quantized_decomposed
SIZE = (32, 32)


def tiny_mobilenet() -> nn.Module:
    torch.manual_seed(0)
    config = MobileNetV1Config(name="mobilenet_v1", alpha=0.25)
    return MobileNetV1Family().build_float_model(config, num_classes=5).eval()


def calibrated(model: nn.Module, march: str = "nash_e", int16: list[str] | None = None):
    prepared, quantizer = prepare_quantized(MobileNetV1Family(), model, SIZE, load_march(march), int16 or [])
    set_mode(prepared, "calibrate")
    with torch.no_grad():
        for _ in range(3):
            prepared(torch.randn(4, 3, *SIZE))
    set_mode(prepared, "eval")
    return prepared, quantizer


def quant_nodes(graph_module, *targets):
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target in targets]


def test_batchnorm_is_folded_before_quantization():
    graph = export_deploy_graph(MobileNetV1Family(), tiny_mobilenet(), SIZE)
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets)


def test_every_weight_is_int8_symmetric_per_channel_with_zero_point_0():
    prepared, _ = calibrated(tiny_mobilenet())
    integer = convert_to_integer(prepared)
    weights = quant_nodes(integer, Q.dequantize_per_channel.default)
    convs_and_linears = [n for n in integer.graph.nodes if n.op == "call_function"
                         and n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)]
    assert len(convs_and_linears) == 28  # 27 convs + the classifier
    int8_weights = [n for n in weights if n.args[-1] == torch.int8]
    assert len(int8_weights) == 28
    for node in int8_weights:
        zero_points = getattr(integer, node.args[2].target)
        assert torch.count_nonzero(zero_points) == 0
        assert node.args[3] == 0  # per output channel


def test_biases_are_int32_with_the_product_scale():
    prepared, _ = calibrated(tiny_mobilenet())
    integer = convert_to_integer(prepared)
    biases = [n for n in quant_nodes(integer, Q.dequantize_per_channel.default) if n.args[-1] == torch.int32]
    assert len(biases) == 28


def test_every_activation_zero_point_is_0():
    prepared, _ = calibrated(tiny_mobilenet())
    integer = convert_to_integer(prepared)
    for node in quant_nodes(integer, Q.quantize_per_tensor.default, Q.dequantize_per_tensor.default):
        assert node.args[2] == 0, node


def test_post_relu_activations_use_the_unsigned_grid_and_are_not_requantized():
    prepared, _ = calibrated(tiny_mobilenet())
    integer = convert_to_integer(prepared)
    quants = quant_nodes(integer, Q.quantize_per_tensor.default)
    dtypes = [n.args[-1] for n in quants]
    assert dtypes[0] == torch.int8  # the network input is signed
    assert dtypes.count(torch.uint8) >= 27  # each conv+relu output
    # one quantize per tensor: no requantization between a conv and the next one
    for node in quants:
        assert node.args[0].target is not Q.dequantize_per_tensor.default


def test_int16_where_the_recipe_asks():
    prepared, quantizer = calibrated(tiny_mobilenet(), int16=["features.1.1*"])
    integer = convert_to_integer(prepared)
    dtypes = [n.args[-1] for n in quant_nodes(integer, Q.quantize_per_tensor.default)]
    assert torch.int16 in dtypes
    assert quantizer.int16_nodes and all(p.startswith("features.1.1") for p in quantizer.int16_nodes)


def test_int16_may_name_the_conv_whose_activation_is_fused():
    by_conv = calibrated(tiny_mobilenet(), int16=["features.1.0.0"])[1].int16_nodes
    by_relu = calibrated(tiny_mobilenet(), int16=["features.1.0.2"])[1].int16_nodes
    assert by_conv == by_relu == ["features.1.0.2"]  # one output quantizer, after the fused ReLU


def test_int16_on_a_march_without_it_is_a_recipe_error():
    with pytest.raises(RecipeError, match="no int16"):
        prepare_quantized(MobileNetV1Family(), tiny_mobilenet(), SIZE, load_march("host"), ["features.*"])


def test_integer_program_matches_the_fake_quant_model():
    prepared, _ = calibrated(tiny_mobilenet())
    x = torch.randn(8, 3, *SIZE)
    with torch.no_grad():
        fake = prepared(x)
        integer = convert_to_integer(prepared)(x)
    assert torch.allclose(fake, integer, atol=1e-4)


def test_checkpoint_state_loads_into_a_rebuilt_graph():
    model = tiny_mobilenet()
    prepared, _ = calibrated(model)
    state = prepared.state_dict()
    rebuilt, _ = prepare_quantized(MobileNetV1Family(), model, SIZE, load_march("nash_e"), [])
    rebuilt.load_state_dict(state)
    set_mode(rebuilt, "eval")
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(prepared(x), rebuilt(x))


def test_an_op_the_quantizer_does_not_know_stays_float_and_is_reported():
    class WithErf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            x = torch.erf(self.conv(x))
            return self.head(x.mean((2, 3)))

    graph = torch.export.export(WithErf().eval(), (torch.randn(2, 3, 8, 8),)).module()
    quantizer = MarchQuantizer(march=load_march("bayes"))
    quantizer.annotate(graph)
    assert any("erf" in op for op in quantizer.unquantized)


def test_calibration_records_ranges_without_changing_outputs():
    model = tiny_mobilenet()
    prepared, _ = prepare_quantized(MobileNetV1Family(), model, SIZE, load_march("nash_e"), [])
    set_mode(prepared, "calibrate")
    x = torch.randn(4, 3, *SIZE)
    with torch.no_grad(), warnings.catch_warnings():
        assert torch.allclose(prepared(x), model(x), atol=1e-4)  # fake quant is off while observing
