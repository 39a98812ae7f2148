"""The `int_infer` model computes in integers exactly what the compiled artifact computes."""

from __future__ import annotations

import collections
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from hatcli.deploy.compile import compile_model
from hatcli.deploy.export import export_onnx
from hatcli.deploy.runtime import load_artifact
from hatcli.quant.flow import convert_to_integer, export_program, prepare_quantized
from hatcli.quant.integer import integer_program
from hatcli.quant.integer_kernels import _accumulate, int_add, quantize_input
from hatcli.quant.march import load_march
from tiny_nets import MiniEfficientDet, TinyFamily, TinyNet, calibrate

SIZE = (16, 16)


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """(reference program, integer program, compiled artifact runner, compiled ONNX) of TinyNet."""
    torch.manual_seed(0)
    prepared, _ = prepare_quantized(TinyFamily(), TinyNet().eval(), SIZE, load_march("nash_e"), [])
    calibrate(prepared, [torch.randn(8, 3, *SIZE) for _ in range(3)])
    reference = convert_to_integer(prepared)
    folder = tmp_path_factory.mktemp("integer")
    example = (torch.randn(2, 3, *SIZE),)
    export_onnx(export_program(reference, example), example, folder / "model.onnx", ["logits"])
    compile_model(folder / "model.onnx", load_march("nash_e"), 3, folder / "compiled", {"shape": ["N", 3, *SIZE]})
    return reference, integer_program(reference), load_artifact(folder / "compiled"), folder / "compiled" / "model.onnx"


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def test_every_quantized_op_of_the_program_is_rewritten_to_integer_arithmetic(programs):
    _, integer, _, _ = programs
    kinds = collections.Counter(op.split()[0] for op in integer.integer_ops)
    assert kinds == {"quantize": 1, "conv2d": 2, "add": 1, "global_avg_pool": 1, "linear": 1}


def test_integer_program_and_compiled_artifact_agree_bit_for_bit(programs):
    reference, integer, runner, _ = programs
    gen = torch.Generator().manual_seed(1)
    # wide inputs saturate the input quantizer and the activations: the clamps must agree too
    images = torch.cat([torch.randn(128, 3, *SIZE, generator=gen), 4 * torch.randn(128, 3, *SIZE, generator=gen)])
    with torch.no_grad():
        ours = _first(integer(images))
        theirs = torch.from_numpy(runner.run(images.numpy())[0])
        ref = _first(reference(images))
    assert torch.equal(ours, theirs)
    # the dequantize -> float op -> quantize reference does not: that is why int_infer exists
    assert (ref - theirs).abs().max() > 0


def test_the_compiler_lowers_add_pooling_and_the_float_classifier_to_exact_ops(programs):
    """The add becomes two Casts and float32 steps, the pool ONNX Runtime's integer-sum kernel,
    and the classifier (a float output) the exact accumulator: MatMulInteger, then two Casts."""
    *_, compiled = programs
    ops = collections.Counter(node.op_type for node in onnx.load(str(compiled)).graph.node)
    assert ops["QLinearGlobalAveragePool"] == 1
    assert ops["QLinearAdd"] == 0 and ops["QLinearConv"] == 2
    assert ops["MatMulInteger"] == 1 and ops["Gemm"] == ops["QGemm"] == 0 and ops["Cast"] == 2 + 2


def test_quantize_divides_by_the_scale_and_rounds_ties_to_even():
    scale = 0.1
    x = torch.tensor([0.05, 0.15, 0.25, -0.05, -0.15, 100.0, -100.0])
    q = quantize_input(x, scale, 0, -128, 127, torch.int8)
    expected = torch.round(x / torch.tensor(scale)).clamp(-128, 127).to(torch.int8)
    assert torch.equal(q, expected)
    assert q[-2:].tolist() == [127, -128]
    ties = quantize_input(torch.tensor([0.5, 1.5, 2.5, -0.5]), 1.0, 0, -128, 127, torch.int8)
    assert ties.tolist() == [0, 2, 2, 0]


@pytest.mark.parametrize("fan_in_channels", [8, 600])
def test_accumulation_is_exact_in_float32_and_in_float64(fan_in_channels):
    gen = torch.Generator().manual_seed(fan_in_channels)
    x = torch.randint(-128, 128, (2, fan_in_channels, 5, 5), generator=gen, dtype=torch.int32)
    w = torch.randint(-127, 128, (4, fan_in_channels, 3, 3), generator=gen, dtype=torch.int32)
    acc = _accumulate("conv2d", x, w, 128, ([1, 1], [1, 1], [1, 1], 1))
    cols = torch.nn.functional.unfold(x.double(), 3, padding=1).to(torch.int64)  # exact integers
    exact = torch.einsum("ok,nkl->nol", w.reshape(4, -1).to(torch.int64), cols).reshape(2, 4, 5, 5)
    assert torch.equal(acc.to(torch.int64), exact)


def test_add_rounds_each_float32_step_like_the_lowered_graph():
    a = torch.tensor([10, -3, 127], dtype=torch.int8)
    b = torch.tensor([5, 3, 127], dtype=torch.int8)
    out = int_add(a, 0.02, 0, b, 0.04, 0, 0.05, 0, -128, 127, torch.int8)
    expected = torch.round(a.float() * torch.tensor(0.4) + b.float() * torch.tensor(0.8)).clamp(-128, 127)
    assert out.tolist() == expected.to(torch.int8).tolist()
    # a fused ReLU holds the result in [zero point, 127]; a fused ReLU6-like clamp in [zero point, 100]
    c = torch.tensor([10, -9, 127], dtype=torch.int8)  # 4 - 3.6 + 2.4 = -1.2 in the middle
    assert int_add(c, 0.02, 0, b, 0.04, 0, 0.05, 0, -128, 127, torch.int8).tolist() == [8, -1, 127]
    assert int_add(c, 0.02, 0, b, 0.04, 0, 0.05, 0, 0, 127, torch.int8).tolist() == [8, 0, 127]
    assert int_add(c, 0.02, 0, b, 0.04, 0, 0.05, 0, 0, 100, torch.int8).tolist() == [8, 0, 100]


def test_int_infer_stage_uses_the_integer_program(monkeypatch, tmp_path: Path):
    from hatcli.workflows import stage_models

    calls = []
    monkeypatch.setattr(stage_models, "integer_model", lambda lr: (calls.append(lr) or programs_stub(), {"classes": ["a"]}))
    recipe = SimpleNamespace(recipe=SimpleNamespace(quant=SimpleNamespace(march="nash_e")))
    model, classes = stage_models.stage_model(recipe, "int_infer")
    assert calls and hasattr(model, "integer_ops") and classes == ["a"]


def programs_stub() -> torch.fx.GraphModule:
    """A converted program small enough to build in a test body."""
    torch.manual_seed(0)
    prepared, _ = prepare_quantized(TinyFamily(), TinyNet().eval(), (8, 8), load_march("nash_e"), [])
    calibrate(prepared, [torch.randn(2, 3, 8, 8)])
    return convert_to_integer(prepared)


class _MiniDetFamily(TinyFamily):
    def build_float_model(self, config, num_classes):
        return MiniEfficientDet()


@pytest.mark.parametrize("opt", [0, 1, 3])
def test_efficientnet_fpn_fcos_ops_agree_with_the_artifact(tmp_path: Path, opt: int):
    """SiLU, squeeze-excite (mean, sigmoid, mul), residual add, nearest and bilinear upsampling,
    cat, a learnable head scale and exp: on `host` every one of them is integer in both programs,
    at every optimization level (at 0 and 1 ONNX Runtime fuses nothing: the compiler does)."""
    torch.manual_seed(0)
    march = load_march("host")
    prepared, _ = prepare_quantized(_MiniDetFamily(), MiniEfficientDet().eval(), SIZE, march, [])
    calibrate(prepared, [torch.randn(8, 3, *SIZE) for _ in range(3)])
    reference = convert_to_integer(prepared)
    integer = integer_program(reference)
    kinds = collections.Counter(op.split()[0] for op in integer.integer_ops)
    assert kinds["table"] >= 6 and kinds["mul"] >= 4 and kinds["resample"] == 1 and kinds["add"] == 2
    example = (torch.randn(2, 3, *SIZE),)
    export_onnx(export_program(reference, example), example, tmp_path / "model.onnx", ["cls", "reg"])
    compile_model(tmp_path / "model.onnx", march, opt, tmp_path / "compiled", {"shape": ["N", 3, *SIZE]})
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "compiled" / "model.onnx")).graph.node)
    assert ops["QLinearConv"] and not ops["Conv"] and not ops["Sigmoid"]
    # tables: our Gather, or ONNX Runtime's QLinearSigmoid where its 256 entries were checked equal
    assert ops["Gather"] + ops["QLinearSigmoid"] >= 6 and ops["Gather"] >= 1 and not ops["QLinearMul"]
    images = 1.5 * torch.randn(64, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cls, reg = integer(images)
    theirs = load_artifact(tmp_path / "compiled").run(images.numpy())
    assert torch.equal(reg, torch.from_numpy(theirs[1]))  # exp table: an integer output, bit for bit
    # the class head is a float output: the dequantized accumulator, computed the same way
    assert torch.equal(cls, torch.from_numpy(theirs[0]))


@pytest.mark.parametrize("signed_weights", [False, True], ids=["uint8 weights", "int8 weights"])
def test_both_weight_formats_compile_to_the_integer_program_bit_for_bit(programs, tmp_path, monkeypatch, signed_weights):
    """uint8 weights (zero point 128) are exact on every CPU; int8 weights (zero point 0, ONNX
    Runtime's faster symmetric kernels) only where u8 x s8 products add up in 32 bits (VNNI)."""
    from hatcli.deploy import compile as compile_module
    from hatcli.deploy.cpu import exact_u8s8

    if signed_weights and not exact_u8s8():
        pytest.skip("this CPU's U8S8 kernels can saturate (no VNNI): the compiler keeps uint8 weights here")
    monkeypatch.setattr(compile_module, "exact_u8s8", lambda: signed_weights)
    _, integer, _, compiled = programs
    source = compiled.parent.parent / "model.onnx"
    out = compile_model(source, load_march("nash_e"), 3, tmp_path / "art", {"shape": ["N", 3, *SIZE]})
    graph = onnx.load(str(out / "model.onnx")).graph
    weights = [init for init in graph.initializer if len(init.dims) == 4]
    want = onnx.TensorProto.INT8 if signed_weights else onnx.TensorProto.UINT8
    assert weights and all(w.data_type == want for w in weights)
    images = 3 * torch.randn(64, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = _first(integer(images))
    assert torch.equal(ours, torch.from_numpy(load_artifact(out).run(images.numpy())[0]))


def test_every_optimization_level_runs_the_integer_program(programs, tmp_path):
    """At `--opt 0` ONNX Runtime fuses no QDQ pattern; the compiler fuses the convs itself and
    writes the classifier (a float output) as its exact accumulator, so the artifact is the
    integer program at every level, bit for bit."""
    _, integer, _, compiled = programs
    out = compile_model(compiled.parent.parent / "model.onnx", load_march("nash_e"), 0, tmp_path / "art",
                        {"shape": ["N", 3, *SIZE]})
    ops = collections.Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert ops["QLinearConv"] and ops["MatMulInteger"] and not ops["Conv"] and not ops["Gemm"]
    images = 3 * torch.randn(64, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = _first(integer(images))
    level0 = torch.from_numpy(load_artifact(out).run(images.numpy())[0])
    level3 = torch.from_numpy(load_artifact(compiled.parent).run(images.numpy())[0])
    assert torch.equal(level0, level3)
    assert torch.equal(ours, level0)


def test_an_int8_weight_artifact_warns_on_a_cpu_without_exact_u8s8(programs, monkeypatch):
    import hatcli.deploy.cpu as cpu

    *_, compiled = programs
    manifest = load_artifact(compiled.parent).manifest
    if manifest["weights"] != "int8":
        pytest.skip("compiled here with uint8 weights")
    monkeypatch.setattr(cpu, "exact_u8s8", lambda: False)
    with pytest.warns(UserWarning, match="VNNI"):
        load_artifact(compiled.parent)


def test_a_runtime_table_kernel_is_used_only_where_its_entries_are_ours():
    from onnx import numpy_helper

    from hatcli.deploy.table_lowering import runtime_table_matches
    from hatcli.quant.integer_kernels import lookup_table

    zero_in = numpy_helper.from_array(np.uint8(128), "z")
    zero_out = numpy_helper.from_array(np.uint8(0), "yz")
    table = lookup_table(torch.sigmoid, 0.05, 128, 0, 255, 1 / 255, 0, 0, 255, torch.uint8).numpy()
    assert runtime_table_matches("Sigmoid", zero_in, 0.05, zero_out, 1 / 255, table)
    wrong = table.copy()
    wrong[200] += 1
    assert not runtime_table_matches("Sigmoid", zero_in, 0.05, zero_out, 1 / 255, wrong)
