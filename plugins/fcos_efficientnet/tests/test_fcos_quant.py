"""The deploy model quantizes completely, and int_infer equals the compiled ONNX artifact bit for bit."""

from __future__ import annotations

import collections

import pytest
import torch

from hatcli.deploy.compile import compile_model
from hatcli.deploy.export import export_onnx
from hatcli.deploy.runtime import load_artifact
from hatcli.errors import RecipeError
from hatcli.quant.flow import convert_to_integer, export_program, prepare_quantized, set_mode
from hatcli.quant.integer import integer_program
from hatcli.quant.march import load_march
from hat_fcos_efficientnet.family import FcosEfficientNetFamily

FAMILY = FcosEfficientNetFamily()
SIZE = (128, 128)
CONFIG = FAMILY.tiny_config()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(quantizer, integer program, compiled artifact folder) of a tiny detector on nash_e."""
    torch.manual_seed(0)
    model = FAMILY.build_float_model(CONFIG, num_classes=3).eval()
    march = load_march("nash_e")
    prepared, quantizer = prepare_quantized(FAMILY, model, SIZE, march, FAMILY.int16_outputs(CONFIG))
    set_mode(prepared, "calibrate")
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn(4, 3, *SIZE))
    reference = convert_to_integer(prepared)
    folder = tmp_path_factory.mktemp("fcos")
    example = (torch.randn(2, 3, *SIZE),)
    export_onnx(export_program(reference, example), example, folder / "model.onnx", FAMILY.output_names)
    compile_model(folder / "model.onnx", march, 3, folder / "compiled", {"shape": ["N", 3, *SIZE]}, measure=False)
    return quantizer, integer_program(reference), folder / "compiled"


def test_every_op_of_the_deploy_graph_is_quantized_and_computed_in_integers(quantized):
    quantizer, integer, _ = quantized
    assert quantizer.unquantized == []
    # the head's output convs are graph outputs: int32 accumulators, dequantized; no int16 quantizer needed
    assert quantizer.int16_nodes == []
    kinds = collections.Counter(op.split()[0] for op in integer.integer_ops)
    deploy = FAMILY.build_deploy_model(FAMILY.build_float_model(CONFIG, num_classes=3))
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in deploy.modules())
    residuals = sum(getattr(m, "residual", False) for m in deploy.modules())
    adds = 4 + 3 * 2 + 1 + residuals  # per BiFPN layer: 4 top-down sums, 3 three-input and 1 two-input bottom-up
    assert kinds == {"quantize": 1, "conv2d": convs, "add": adds}
    # what is left besides quantize / dequantize: max pooling and nearest upsampling, exact on the grid
    left = {str(n.target) for n in integer.graph.nodes if n.op == "call_function"
            and "quantized_decomposed" not in str(n.target) and getattr(n.target, "__module__", "") != "hatcli.quant.integer_kernels"}
    assert left == {"aten.max_pool2d.default", "aten.upsample_nearest2d.vec"}


def test_int_infer_equals_the_compiled_artifact_on_all_fifteen_outputs(quantized):
    _, integer, artifact = quantized
    images = 1.5 * torch.randn(6, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = integer(images)
    theirs = load_artifact(artifact).run(images.numpy())
    assert len(ours) == len(theirs) == 15
    for name, a, b in zip(FAMILY.output_names, ours, theirs):
        assert torch.equal(a, torch.from_numpy(b)), name


def test_int16_patterns_are_refused_on_a_march_without_int16():
    model = FAMILY.build_float_model(CONFIG, num_classes=3).eval()
    with pytest.raises(RecipeError, match="host"):
        prepare_quantized(FAMILY, model, SIZE, load_march("host"), FAMILY.int16_outputs(CONFIG))
