"""`MarchQuantizer` op by op: how each pattern the three families use is quantized.

Each case puts one op pattern between two quantized tensors (`tiny_nets.OpNet`: a signed conv
stem, the pattern, a flatten), prepares it with `prepare_quantized`, calibrates and converts it,
and reads the integer program: which tensors have a quantize, on which grid, with which scale.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.nn import functional as F

from hatcli.deploy.check import FALLBACK, check_model
from hatcli.deploy.compile import compile_model
from hatcli.deploy.export import export_onnx
from hatcli.quant.flow import convert_to_integer, export_program, prepare_quantized, set_mode
from hatcli.quant.march import load_march
from hatcli.quant.quantizer import module_path
from tiny_nets import Fn, MiniEfficientDet, OpNet, TinyFamily

A = torch.ops.aten
Q = torch.ops.quantized_decomposed
QUANT = Q.quantize_per_tensor.default
DEQUANT = Q.dequantize_per_tensor.default
SIZE = (8, 8)
S8, U8, S16 = torch.int8, torch.uint8, torch.int16


def conv(cin: int = 4, cout: int = 4) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


def pooled(fn):
    """`fn` after a max pool, so that nothing fuses it into the stem conv."""
    return Fn(lambda m, x: fn(F.max_pool2d(x, 2)))


@dataclass(frozen=True)
class Case:
    """An op pattern (`make` builds OpNet's `op`) and what its quantization must look like.

    kind: `fused` - `op` (a conv / linear / add) has no quantize of its own, its clamp does;
    `table` - `op`'s accumulator is requantized onto int16 and its fused table activation
    (sigmoid, SiLU, ...) maps that grid onto `dtype`;
    `fresh` - `op`'s output gets its own quantize; `shared` - `op`'s output keeps its input's scale
    and grid; `cat` - every input and the output share one scale. `dtype`: grid of the output.
    """

    make: object
    op: str
    kind: str
    dtype: torch.dtype = S8
    march: str = "nash_e"
    int16: tuple[str, ...] = ()
    requantizes: int = 0
    """Requantizations (quantize of a dequantize) the pattern needs."""
    absent: tuple[str, ...] = field(default=())
    """aten ops that must not remain in the integer program."""


CASES: dict[str, Case] = {
    # conv (+bn) (+activation), linear, as the three families use them
    "conv_bn_relu": Case(lambda: nn.Sequential(conv(), nn.BatchNorm2d(4), nn.ReLU()), "conv2d", "fused", U8,
                         absent=("_native_batch_norm_legit_no_training", "batch_norm")),
    "conv_bn_relu6": Case(lambda: nn.Sequential(conv(), nn.BatchNorm2d(4), nn.ReLU6()), "conv2d", "fused", U8),
    "conv_clamp": Case(lambda: Fn(lambda m, x: torch.clamp(m.c(x), 0, 4), c=conv()), "conv2d", "fused", U8),
    "conv_hardtanh_signed": Case(lambda: nn.Sequential(conv(), nn.Hardtanh(-1, 1)), "conv2d", "fused", S8),
    "conv_bn_silu": Case(lambda: nn.Sequential(conv(), nn.BatchNorm2d(4), nn.SiLU()), "conv2d", "table", S8,
                         absent=("batch_norm",)),
    "conv_sigmoid": Case(lambda: nn.Sequential(conv(), nn.Sigmoid()), "conv2d", "table", U8),
    "conv_silu_host": Case(lambda: nn.Sequential(conv(), nn.SiLU()), "conv2d", "fresh", S8, march="host",
                           absent=("silu",)),
    "conv_sigmoid_host": Case(lambda: nn.Sequential(conv(), nn.Sigmoid()), "conv2d", "fresh", S8, march="host"),
    "linear_relu": Case(lambda: nn.Sequential(nn.Linear(8, 6), nn.ReLU()), "linear", "fused", U8),
    # elementwise arithmetic
    "add": Case(lambda: Fn(lambda m, x: m.a(x) + m.b(x), a=conv(), b=conv()), "add", "fresh", S8),
    "add_relu": Case(lambda: Fn(lambda m, x: torch.relu(m.a(x) + x), a=conv()), "add", "fused", U8),
    "sub_relu_not_fused": Case(lambda: Fn(lambda m, x: torch.relu(torch.relu(x) - torch.relu(m.a(x))), a=conv()),
                               "sub", "fresh", S8),
    "add_constant": Case(lambda: Fn(lambda m, x: x + 0.5), "add", "fresh", S8),
    "add_unsigned": Case(lambda: Fn(lambda m, x: torch.relu(m.a(x)) + torch.relu(x), a=conv()),
                         "add", "fresh", U8),
    "mul_activations": Case(lambda: Fn(lambda m, x: x * torch.sigmoid(m.a(x)), a=conv()), "mul", "fresh", S8),
    "mul_unsigned": Case(lambda: Fn(lambda m, x: torch.relu(x) * torch.sigmoid(m.a(x)), a=conv()),
                         "mul", "fresh", U8),
    "mul_scale_parameter": Case(lambda: _Scale(), "mul", "fresh", S8),
    "mul_exp_of_parameter": Case(lambda: Fn(lambda m, x: x * m.s.s.exp(), s=_Scale()), "mul", "fresh", S8),
    "mul_scalar": Case(lambda: Fn(lambda m, x: x * 3.0), "mul", "fresh", S8),
    "div_scalar": Case(lambda: Fn(lambda m, x: x / 4.0), "div", "fresh", S8),
    # cat: one scale
    "cat_unsigned": Case(lambda: Fn(lambda m, x: torch.cat([torch.relu(m.a(x)), torch.relu(x)], 1), a=conv()),
                         "cat", "cat", U8),
    "cat_signed": Case(lambda: Fn(lambda m, x: torch.cat([m.a(x), x], 1), a=conv()), "cat", "cat", S8),
    "cat_mixed_grids": Case(lambda: Fn(lambda m, x: torch.cat([torch.relu(m.a(x)), x], 1), a=conv()),
                            "cat", "cat", S8, requantizes=1),
    # scale-preserving ops
    "max_pool": Case(lambda: nn.MaxPool2d(3, 2, 1), "max_pool2d", "shared"),
    "max_pool_with_indices": Case(lambda: Fn(lambda m, x: F.max_pool2d(x, 2, return_indices=True)[0]),
                                  "max_pool2d_with_indices", "shared"),
    "max_pool_unsigned": Case(lambda: Fn(lambda m, x: F.max_pool2d(torch.relu(x), 2)),
                              "max_pool2d", "shared", U8),
    "avg_pool": Case(lambda: nn.AvgPool2d(2), "avg_pool2d", "shared"),
    "adaptive_avg_pool": Case(lambda: nn.AdaptiveAvgPool2d(1), "adaptive_avg_pool2d", "shared"),
    "mean_keepdim": Case(lambda: Fn(lambda m, x: x.mean((2, 3), keepdim=True)), "mean", "shared"),
    "upsample_nearest": Case(lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=2, mode="nearest")),
                             "upsample_nearest2d", "shared"),
    "upsample_bilinear": Case(lambda: Fn(lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear")),
                              "upsample_bilinear2d", "shared"),
    "reshape": Case(lambda: Fn(lambda m, x: x.reshape(x.shape[0], 2, -1)), "reshape", "shared"),
    "permute": Case(lambda: Fn(lambda m, x: x.permute(0, 2, 3, 1)), "permute", "shared"),
    "zero_pad": Case(lambda: Fn(lambda m, x: F.pad(x, (1, 1, 1, 1))), "pad", "shared"),
    # look-up-table ops on their own: own output scale
    "sigmoid": Case(lambda: pooled(torch.sigmoid), "sigmoid", "fresh", U8),
    "hardsigmoid": Case(lambda: pooled(F.hardsigmoid), "hardsigmoid", "fresh", U8),
    "tanh": Case(lambda: pooled(torch.tanh), "tanh", "fresh", S8),
    "hardswish": Case(lambda: pooled(F.hardswish), "hardswish", "fresh", S8),
    "exp": Case(lambda: pooled(torch.exp), "exp", "fresh", U8),
    "silu_alone": Case(lambda: pooled(F.silu), "mul", "fresh", S8, absent=("silu",)),
    "relu6_alone": Case(lambda: pooled(F.relu6), "relu6", "fresh", U8),
    # int16 where a pattern names the module
    "sigmoid_int16": Case(lambda: pooled(torch.sigmoid), "sigmoid", "fresh", S16, int16=("op",)),
    "exp_int16": Case(lambda: pooled(torch.exp), "exp", "fresh", S16, int16=("op",)),
    "mul_int16": Case(lambda: Fn(lambda m, x: x * torch.sigmoid(m.a(x)), a=conv()), "mul", "fresh", S16,
                      int16=("op",)),
    "conv_silu_int16": Case(lambda: nn.Sequential(conv(), nn.SiLU()), "conv2d", "table", S16, int16=("op*",)),
    "upsample_after_int16": Case(lambda: Fn(lambda m, x: F.interpolate(m.c(x), scale_factor=2), c=conv()),
                                 "upsample_nearest2d", "shared", S16, int16=("op.c",)),
}


class _Scale(nn.Module):
    """A learnable scalar, like FCOS's per-level regression scale."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(0.75))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


@dataclass
class Built:
    prepared: GraphModule
    integer: GraphModule
    unquantized: list[str]
    fake: torch.Tensor
    out: torch.Tensor


def _skip_eval_rewrite(prepared: GraphModule) -> None:
    """Moving an exported graph to eval mode rewrites dropout / batch norm by matching patterns it
    exports first (~2 s each time); these graphs have neither (BN is folded), so mark it done."""
    ops = {str(n.target) for n in prepared.graph.nodes if n.op == "call_function"}
    assert not any("dropout" in op or "batch_norm" in op for op in ops)
    prepared._exported_training = False


def prepared_net(net: nn.Module, march: str = "nash_e", int16: tuple[str, ...] = (), size=SIZE):
    prepared, quantizer = prepare_quantized(TinyFamily(), net.eval(), size, load_march(march), list(int16))
    _skip_eval_rewrite(prepared)
    set_mode(prepared, "calibrate")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn(4, 3, *size, generator=gen))
    set_mode(prepared, "eval")
    return prepared, quantizer


@lru_cache(maxsize=None)
def build(name: str) -> Built:
    case = CASES[name]
    prepared, quantizer = prepared_net(OpNet(case.make()), case.march, case.int16)
    x = torch.randn(6, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fake = prepared(x)
        integer = convert_to_integer(prepared)
        out = integer(x)
    return Built(prepared, integer, list(quantizer.unquantized), fake, out)


# -- reading the integer program -----------------------------------------------------------------
def nodes(graph: GraphModule, *targets) -> list[Node]:
    return [n for n in graph.graph.nodes if n.op == "call_function" and n.target in targets]


def opname(node: Node) -> str:
    """`conv2d` for aten.conv2d.default ('' for what is not an aten op)."""
    packet = getattr(node.target, "_overloadpacket", None)
    return packet.__name__ if packet is not None else ""


def op_node(graph: GraphModule, name: str) -> Node:
    """The last node of aten op `name` inside the pattern module (`op...`)."""
    found = [n for n in graph.graph.nodes if n.op == "call_function" and module_path(n).startswith("op")
             and opname(n) == name]
    assert found, f"no {name} in the pattern"
    return found[-1]


def quantize_after(node: Node) -> Node | None:
    """The quantize of `node`'s output (through the getitem of a tuple-returning op)."""
    users = list(node.users)
    data = [u for u in users if u.target is operator.getitem and u.args[1] == 0]
    if data:
        users = list(data[0].users)
    quants = [u for u in users if u.target == QUANT]
    return quants[0] if quants else None


def dequantize_before(node: Node, index: int = 0) -> Node:
    arg = node.args[index]
    assert isinstance(arg, Node) and arg.target == DEQUANT, f"{node} input {index} is not dequantized"
    return arg


def qparams(node: Node) -> tuple[float, int, torch.dtype]:
    """(scale, zero point, dtype) of a quantize / dequantize node."""
    return node.args[1], node.args[2], node.args[-1]


def requantizations(graph: GraphModule) -> list[Node]:
    """Quantize nodes that quantize a dequantized tensor again (a second rounding)."""
    return [q for q in nodes(graph, QUANT) if isinstance(q.args[0], Node) and q.args[0].target == DEQUANT]


# -- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_pattern_is_quantized_as_designed(name: str) -> None:
    case, built = CASES[name], build(name)
    integer = built.integer
    assert built.unquantized == []
    node = op_node(integer, case.op)
    if case.kind == "fused":
        assert quantize_after(node) is None, "the fused op's own output must not be quantized"
        (act,) = node.users
        assert qparams(quantize_after(act))[2] == case.dtype
    elif case.kind == "table":
        wide = quantize_after(node)
        assert wide is not None and qparams(wide)[2] == torch.int16, "the table reads the int16 accumulator"
        ((dq,),) = [list(wide.users)]
        (act,) = dq.users
        assert qparams(quantize_after(act))[2] == case.dtype
    elif case.kind == "fresh":
        q = quantize_after(node)
        assert q is not None and qparams(q)[2] == case.dtype
        inputs = [qparams(a) for a in node.args[:2] if isinstance(a, Node) and a.target == DEQUANT]
        assert inputs and all(scale != qparams(q)[0] for scale, _, _ in inputs)
    elif case.kind == "shared":
        q, dq = quantize_after(node), dequantize_before(node)
        assert q is not None and qparams(q) == qparams(dq), "the output must keep the input's scale"
        assert qparams(q)[2] == case.dtype
    elif case.kind == "cat":
        q = quantize_after(node)
        inputs = [qparams(t) for t in node.args[0]]
        assert all(p == qparams(q) for p in inputs), "cat inputs and output must share one scale"
        assert qparams(q)[2] == case.dtype
    assert len(requantizations(integer)) == case.requantizes
    remaining = {opname(n) for n in integer.graph.nodes if n.op == "call_function"}
    assert not remaining & set(case.absent)


@pytest.mark.parametrize("name", list(CASES))
def test_every_zero_point_is_0_and_weights_are_per_channel_int8(name: str) -> None:
    integer = build(name).integer
    for node in nodes(integer, QUANT, DEQUANT):
        assert node.args[2] == 0, node
    for node in nodes(integer, Q.dequantize_per_channel.default):
        assert node.args[3] == 0  # output channel axis
        assert torch.count_nonzero(getattr(integer, node.args[2].target)) == 0
        assert node.args[-1] in (torch.int8, torch.int32)
    for node in nodes(integer, A.conv2d.default, A.linear.default):
        weight = node.args[1]
        assert weight.target == Q.dequantize_per_channel.default and weight.args[-1] == torch.int8


@pytest.mark.parametrize("name", list(CASES))
def test_integer_program_stays_within_an_output_step_of_fake_quant(name: str) -> None:
    """The integer program rounds the int32 bias, fake quant adds the float bias: near a rounding
    tie an output moves by one step (the stem has no bias, so no earlier tie propagates)."""
    built = build(name)
    output = next(n for n in built.integer.graph.nodes if n.op == "output").args[0]
    out_dq = output[0] if isinstance(output, (tuple, list)) else output
    steps = (built.fake - built.out).abs() / qparams(out_dq)[0]
    assert built.fake.shape == built.out.shape
    bound = 1.01
    if CASES[name].kind == "table":  # a step of the int16 accumulator grid moves the table's input too
        wide = quantize_after(op_node(built.integer, CASES[name].op))
        bound += 1.1 * qparams(wide)[0] / qparams(out_dq)[0]  # SiLU's and sigmoid's slopes stay below 1.1
    assert steps.max() <= bound
    assert (steps > 0).float().mean() < 0.2


def test_cat_of_mixed_grids_requantizes_the_unsigned_input_to_the_signed_scale() -> None:
    integer = build("cat_mixed_grids").integer
    (requant,) = requantizations(integer)
    assert qparams(requant.args[0])[2] == U8 and qparams(requant)[2] == S8
    # the signed input is not clipped: the integer output still has negative values
    assert (build("cat_mixed_grids").out < 0).any()


def test_int16_nodes_name_the_new_ops() -> None:
    _, quantizer = prepared_net(OpNet(CASES["mul_int16"].make()), int16=("op",))
    assert quantizer.int16_nodes == ["op", "op"]  # the sigmoid and the mul; `op.a` (the conv) is int8


def test_host_gets_separate_integer_activations_and_bpu_marches_fuse_them() -> None:
    """`host` does not fuse SiLU / sigmoid (ONNX Runtime has no such fused integer kernel): the
    conv output is quantized and SiLU becomes a quantized sigmoid times x."""
    host = build("conv_silu_host").integer
    sigmoid = op_node(host, "sigmoid")
    assert qparams(quantize_after(sigmoid))[2] == U8
    assert qparams(quantize_after(op_node(host, "mul")))[2] == S8
    nash = build("conv_bn_silu").integer
    assert not nodes(nash, A.sigmoid.default) and nodes(nash, A.silu.default)


# -- unsupported ops, and the whole path to ONNX Runtime ------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GraphModule, list[str]]:
    """MiniEfficientDet with GroupNorm and erf, calibrated on nash_e and exported to ONNX."""
    prepared, quantizer = prepared_net(MiniEfficientDet(float_ops=True), size=(16, 16))
    integer = convert_to_integer(prepared)
    example = (torch.randn(2, 3, 16, 16),)
    path = tmp_path_factory.mktemp("ops") / "model.onnx"
    export_onnx(export_program(integer, example), example, path, ["cls", "reg", "aux"])
    return path, integer, list(quantizer.unquantized)


def test_unsupported_ops_stay_float_and_are_reported(exported) -> None:
    _, integer, unquantized = exported
    assert len(unquantized) == 2
    assert "group_norm" in unquantized[0] and "`norm`" in unquantized[0]
    assert "erf" in unquantized[1]
    (norm,), (erf,) = nodes(integer, A.group_norm.default), nodes(integer, A.erf.default)
    assert norm.args[0].target == DEQUANT  # reads the dequantized int8 tensor
    assert list(norm.users) == [erf] and erf.args[0] is norm  # float in, float out
    # the conv after the float ops re-enters the integer domain with a fresh input scale
    assert all(dequantize_before(n).target == DEQUANT for n in nodes(integer, A.conv2d.default))


def test_check_reports_unsupported_ops_as_cpu_fallback_and_the_rest_on_the_bpu(exported) -> None:
    path, _, _ = exported
    report = check_model(path, load_march("nash_e"))
    fallback = {r.op_type: r.reason for r in report.rows if r.status == FALLBACK}
    assert "float compute" in fallback.pop("Erf")  # the march has Erf, but not on float inputs
    # GroupNorm is one GroupNormalization, or InstanceNormalization between reshapes, then Mul, Add
    norm = [op for op in fallback if op in ("GroupNormalization", "InstanceNormalization")]
    assert len(norm) == 1 and "not supported on nash_e" in fallback[norm[0]]
    assert set(fallback) - set(norm) <= {"Reshape", "Mul", "Add"}
    on_bpu = [r for r in report.rows if r.status != FALLBACK]
    assert {"Conv", "ReduceMean", "Mul", "Add", "Resize", "Concat", "Relu", "Exp"} <= {r.op_type for r in on_bpu}
    assert sum("SiLU" in r.fused for r in on_bpu if r.op_type == "Conv") == 4  # stem, dw, SE, down


def test_compiled_model_runs_on_onnx_runtime_like_the_integer_program(exported, tmp_path: Path) -> None:
    path, integer, _ = exported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = compile_model(path, load_march("nash_e"), 2, tmp_path / "art", {"shape": [1, 3, 16, 16]})
    session = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = integer(x)
    assert len(got) == 3
    # ONNX Runtime's kernels (float conv + SiLU, Resize, its own GroupNorm for `aux`) may land on
    # the other side of a rounding tie than torch: a step here and there, never a systematic error
    for a, b in zip(got, want):
        diff, scale = np.abs(a - b.numpy()), float(b.abs().max())
        assert a.shape == tuple(b.shape) and diff.max() <= 0.1 * scale and diff.mean() <= 0.005 * scale
    for a, b in zip(got[:2], want[:2]):
        diff, scale = np.abs(a - b.numpy()), float(b.abs().max())
        assert diff.max() <= 0.02 * scale and diff.mean() <= 0.002 * scale
