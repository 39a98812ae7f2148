"""The `int_infer` model: the integer program computed with integer arithmetic, as deployed.

`convert_pt2e` gives a *reference* program: every quantized op is written as
dequantize -> float op -> quantize. That is the standard interchange form (it is what `hat export`
writes to ONNX), but it does not compute what an integer accelerator computes: the float conv
sums rounded products in some order, and torch's quantize multiplies by the reciprocal of the
scale. Near a rounding boundary both differ from the integer result by one step, and one step in
an early layer moves the logits by hundreds of output steps.

`integer_program` rewrites a copy of the reference program so that each quantized op computes
exactly what the deployed runtime computes:

- quantize (the model input): ``q = clamp(round_half_even(x / s)) + z`` (a division, in float32);
- conv / linear: the int32 accumulator ``sum((q_x - z_x) * q_w) + q_bias`` is computed exactly,
  then requantized with the per-channel float32 multiplier ``m = (s_x * s_w) / s_y``:
  ``q_y = clamp(round_half_even(float32(acc) * m)) + z_y``, where a fused clamp (ReLU, ReLU6,
  hardtanh, clamp: `hatcli.quant.clamps`) narrows the clamp to its bounds on the
  output grid. A conv or linear that is not requantized (a graph output, or a float op after it)
  returns ``float32(acc) * (s_x * s_w)`` (the dequantized accumulator, then the fused clamp in
  float);
- global average pooling: the exact integer sum, requantized with ``s_x / (s_y * N)``;
- add / sub: ``(q_a - z_a) * (s_a / s_y) ± (q_b - z_b) * (s_b / s_y)`` in float32, one rounding
  per operation, then rounded half to even and held in the (clamp-narrowed) output range (the
  compiler lowers the op to exactly these ops);
- mul of two 8-bit tensors: the exact integer product times ``(s_a s_b) / s_y``;
- bilinear upsampling (same scale in and out): interpolation of the integers ``q - z`` in
  float32, exact for a factor of 2, rounded half to even;
- sigmoid, tanh, hardsigmoid, hardswish, exp, sign (binary networks), and mul / div by a constant,
  on an 8-bit input: a
  256-entry lookup table, built by `lookup_table` here and by the compiler alike.

Those are the formulas of the kernels the compiled artifact runs (ONNX Runtime's QLinearConv,
QGemm, QuantizeLinear, QLinearGlobalAveragePool: round half to even, float32 multiplier; and the
explicit add of `hatcli.deploy.lowering`), so the integer program and the artifact agree bit for
bit on these ops. Ops without a rule here keep their reference
form (they run in float in the artifact too).

The accumulator is computed as a float convolution of integer values, which is exact while every
partial sum stays below 2**24 in float32 (checked from the operand ranges) and otherwise done in
float64 (exact below 2**53).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)
from torch.fx import GraphModule, Node

from hatcli.errors import warn
from hatcli.quant.bias_range import AccumulatorOverflow, accumulator_bound
from hatcli.quant.clamps import ClampBounds
from hatcli.quant.integer_kernels import (
    int_add,
    int_avg_pool,
    int_global_avg_pool,
    int_lookup,
    int_mul,
    int_resample,
    int_weighted,
    lookup_table,
    quantize_input,
)
from hatcli.quant.integer_kernels_nn import (
    grid_bound,
    int_add_float,
    int_layer_norm,
    int_matmul,
    int_softmax,
    layer_norm_epsilon,
    softmax_table,
)
from hatcli.quant.op_sets import CLAMP_OPS, LAYER_NORM_OPS, MATMUL_OPS, SOFTMAX_OPS, clamp_bounds
from hatcli.quant.quantizer import module_path

QD = torch.ops.quantized_decomposed
A = torch.ops.aten
Q_TENSOR = {QD.quantize_per_tensor.default}
DQ_TENSOR = {QD.dequantize_per_tensor.default}
DQ_CHANNEL = {QD.dequantize_per_channel.default}
CONV = {A.conv2d.default, A.conv1d.default}
LINEAR = {A.linear.default}
ADD = {A.add.Tensor, A.add_.Tensor}
SUB = {A.sub.Tensor, A.sub_.Tensor}
MUL = {A.mul.Tensor, A.mul_.Tensor}
DIV = {A.div.Tensor, A.div_.Tensor}
TABLE_OPS = {A.sigmoid.default, A.tanh.default, A.hardsigmoid.default, A.hardswish.default, A.exp.default,
             A.sign.default, A.gelu.default, A.silu.default, A.sigmoid_.default, A.tanh_.default,
             A.hardsigmoid_.default, A.hardswish_.default, A.exp_.default, A.gelu_.default, A.silu_.default}
"""Elementwise functions of one tensor, computed as a 256-entry table on 8-bit inputs."""
INTEGER_GRIDS = (torch.int8, torch.uint8, torch.int16, torch.uint16)
"""The grids integer ops take (8- and 16-bit)."""
RESAMPLE = {A.upsample_bilinear2d.vec}
GLOBAL_POOL = {A.adaptive_avg_pool2d.default, A.mean.dim}
AVG_POOL = {A.avg_pool2d.default}


@dataclass
class _QParams:
    """Per-tensor quantization parameters read off a quantize / dequantize node."""

    source: Node
    scale: float
    zero: int
    qmin: int
    qmax: int
    dtype: torch.dtype

    @classmethod
    def of(cls, node: Node) -> "_QParams | None":
        if not isinstance(node, Node) or node.op != "call_function":
            return None
        if node.target not in Q_TENSOR and node.target not in DQ_TENSOR:
            return None
        source, scale, zero, qmin, qmax, dtype = node.args[:6]
        if not all(isinstance(v, (int, float)) for v in (scale, zero, qmin, qmax)):
            return None  # tensor-valued qparams: not a converted static program
        return cls(source, float(scale), int(zero), int(qmin), int(qmax), dtype)


def _single_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _output_quantize(node: Node) -> tuple[Node | None, ClampBounds | None, Node | None]:
    """(the fused clamp node, its bounds, the quantize node) after `node`; None where absent (no
    clamp; a float output). A clamp whose bounds are not constants is not fused."""
    user = _single_user(node)
    clamp, bounds = None, None
    if user is not None and user.op == "call_function" and user.target in CLAMP_OPS:
        bounds = clamp_bounds(user.target, user.args, user.kwargs)
        if bounds is None:
            return None, None, None
        clamp, user = user, _single_user(user)
    if user is not None and user.op == "call_function" and user.target in Q_TENSOR:
        return clamp, bounds, user
    return clamp, bounds, None


def _grid_bounds(bounds: ClampBounds | None, yq: "_QParams") -> tuple[int, int]:
    """The integer range an output is held in: its grid's, narrowed by a fused clamp."""
    return (yq.qmin, yq.qmax) if bounds is None else bounds.on_grid(yq.scale, yq.zero, yq.qmin, yq.qmax)


def _pair(value: object, default: tuple[int, int]) -> tuple[int, int]:
    """An int or a 1- or 2-element list of a 2-D op's argument as (h, w); `default` when empty."""
    if isinstance(value, int):
        return value, value
    if not value:
        return default
    values = [int(v) for v in value]  # type: ignore[union-attr]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _is_graph_output(node: Node) -> bool:
    return any(u.op == "output" for u in node.users)


def _weight_parts(gm: GraphModule, node: Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 weight, per-channel scale) of a dequantize_per_channel of constant attributes."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target in DQ_CHANNEL):
        return None
    q, scale, zero = node.args[:3]
    if not all(isinstance(n, Node) and n.op == "get_attr" for n in (q, scale, zero)):
        return None
    zero_t = _attr(gm, zero.target)
    if bool((zero_t != 0).any()):
        return None
    return _attr(gm, q.target), _attr(gm, scale.target)


def _attr(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _bias_part(gm: GraphModule, node: object) -> torch.Tensor | None | bool:
    """The int32 bias of a dequantized int32 bias, None when there is no bias, False if unusable."""
    if node is None:
        return None
    parts = _weight_parts(gm, node)
    return False if parts is None else parts[0]


def _traced_from(node: Node) -> dict:
    """The metadata that says which module a node was traced from, for the node replacing it."""
    return {key: node.meta[key] for key in ("nn_module_stack", "stack_trace") if key in node.meta}


class _Rewriter:
    def __init__(self, gm: GraphModule, accumulator_bits: int) -> None:
        self.gm = gm
        self.count = 0
        self.rewritten: list[str] = []
        self.accumulator_bits = accumulator_bits
        self.overflows: list[AccumulatorOverflow] = []

    def constant(self, value: torch.Tensor, stem: str, before: Node) -> Node:
        """`value` as a buffer of the module, read by a node placed before `before`."""
        name = f"_int_{stem}_{self.count}"
        self.count += 1
        self.gm.register_buffer(name, value.detach().clone())
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.get_attr(name)

    def replace(self, node: Node, anchor: Node, fn: Callable, args: tuple, label: str) -> bool:
        """Put ``fn(*args)`` before `anchor` (the op's last node) in place of it, carrying the
        metadata of `node` (the op), and record the rewrite as `label`."""
        with self.gm.graph.inserting_before(anchor):
            new = self.gm.graph.call_function(fn, args)
        new.meta.update(_traced_from(node))
        anchor.replace_all_uses_with(new)
        self.rewritten.append(f"{label} {node.name}")
        return True

    def weighted(self, node: Node) -> bool:
        op = "linear" if node.target not in CONV else "conv1d" if node.target == A.conv1d.default else "conv2d"
        xq = _QParams.of(node.args[0])
        weights = _weight_parts(self.gm, node.args[1])
        bias_arg = node.args[2] if len(node.args) > 2 else None
        bias = _bias_part(self.gm, bias_arg)
        if xq is None or weights is None or bias is False or node.args[0].target not in DQ_TENSOR:
            return False
        if op != "linear":
            one = [1] * (1 if op == "conv1d" else 2)
            conv_args = tuple(node.args[3:]) + (one, [0] * len(one), one, 1)[len(node.args[3:]):]
        else:
            conv_args = ()
        clamp_node, bounds, quant = _output_quantize(node)
        yq = _QParams.of(quant) if quant is not None else None
        if quant is not None and yq is None:
            return False
        # not requantized (a graph output, a float op after it): the dequantized accumulator
        last = quant or clamp_node or node
        q_w, w_scale = weights
        self.check_accumulator(node, q_w, xq, bias)
        low, high = _grid_bounds(bounds, yq) if yq is not None else (0, 0)
        args = (op, xq.source, xq.scale, xq.zero, xq.qmin, xq.qmax,
                self.constant(q_w, "weight", last), self.constant(w_scale, "weight_scale", last),
                None if bias is None else self.constant(bias, "bias", last), conv_args,
                None if yq is None else yq.scale, 0 if yq is None else yq.zero, low, high,
                None if yq is None else yq.dtype, None if bounds is None else bounds.as_float(),
                self.accumulator_bits)
        return self.replace(node, last, int_weighted, args, op)

    def check_accumulator(self, node: Node, q_w: torch.Tensor, xq: "_QParams", bias: torch.Tensor | None) -> None:
        """Record a layer whose accumulator can pass the march's (see `AccumulatorOverflow`)."""
        x_bound = max(abs(xq.qmin - xq.zero), abs(xq.qmax - xq.zero))
        bias_bound = 0 if bias is None else int(bias.to(torch.int64).abs().max())
        bound = accumulator_bound(q_w.reshape(q_w.shape[0], -1).to(torch.int64), x_bound, bias_bound)
        if bound > 2 ** (self.accumulator_bits - 1) - 1:
            self.overflows.append(AccumulatorOverflow(
                module_path(node) or node.name, str(xq.dtype).removeprefix("torch."), int(q_w[0].numel()),
                bound, self.accumulator_bits))

    def global_pool(self, node: Node) -> bool:
        xq = _QParams.of(node.args[0])
        if xq is None or node.args[0].target not in DQ_TENSOR:
            return False
        if node.target == A.adaptive_avg_pool2d.default:
            if list(node.args[1]) != [1, 1]:
                return False
            keepdim = True
        else:
            dims = sorted(d % 4 for d in node.args[1])
            if dims != [2, 3]:
                return False
            keepdim = bool(node.args[2]) if len(node.args) > 2 else False
        quant = _single_user(node)
        yq = _QParams.of(quant) if quant is not None and quant.target in Q_TENSOR else None
        if yq is None:
            return False
        return self.replace(node, quant, int_global_avg_pool, (
            xq.source, xq.scale, xq.zero, yq.scale, yq.zero, yq.qmin, yq.qmax, yq.dtype, keepdim), "global_avg_pool")

    def avg_pool(self, node: Node) -> bool:
        xq = _QParams.of(node.args[0])
        quant = _single_user(node)
        yq = _QParams.of(quant) if quant is not None and quant.target in Q_TENSOR else None
        if xq is None or yq is None or node.args[0].target not in DQ_TENSOR or xq.dtype not in INTEGER_GRIDS:
            return False
        kernel, stride, padding, ceil_mode, count_include_pad, divisor_override = (
            list(node.args[1:]) + [None] * 6)[:6]
        if divisor_override is not None or node.kwargs:
            return False  # ONNX's AveragePool has no divisor override: left to the reference on both sides
        kernel = _pair(kernel, (1, 1))
        args = (kernel, _pair(stride, kernel), _pair(padding, (0, 0)), bool(ceil_mode),
                True if count_include_pad is None else bool(count_include_pad))
        return self.replace(node, quant, int_avg_pool, (
            xq.source, xq.scale, xq.zero, yq.scale, yq.zero, yq.qmin, yq.qmax, yq.dtype, *args), "avg_pool")

    def _binary_inputs(self, node: Node) -> tuple[_QParams, _QParams] | None:
        if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            return None
        aq, bq = _QParams.of(node.args[0]), _QParams.of(node.args[1])
        if aq is None or bq is None or node.args[0].target not in DQ_TENSOR or node.args[1].target not in DQ_TENSOR:
            return None
        return aq, bq

    def add(self, node: Node) -> bool:
        inputs = self._binary_inputs(node)
        _, bounds, quant = _output_quantize(node)
        yq = _QParams.of(quant) if quant is not None else None
        if inputs is None or yq is None:
            return False
        (aq, bq), subtract = inputs, node.target in SUB
        low, high = _grid_bounds(bounds, yq)
        return self.replace(node, quant, int_add, (
            aq.source, aq.scale, aq.zero, bq.source, bq.scale, bq.zero,
            yq.scale, yq.zero, low, high, yq.dtype, subtract), "sub" if subtract else "add")

    def mul(self, node: Node) -> bool:
        inputs = self._binary_inputs(node)
        quant = _single_user(node)
        yq = _QParams.of(quant) if quant is not None and quant.target in Q_TENSOR else None
        if inputs is None or yq is None or any(q.dtype not in INTEGER_GRIDS for q in inputs):
            return False
        aq, bq = inputs
        return self.replace(node, quant, int_mul, (
            aq.source, aq.scale, aq.zero, bq.source, bq.scale, bq.zero,
            yq.scale, yq.zero, yq.qmin, yq.qmax, yq.dtype), "mul")

    def table(self, node: Node) -> bool:
        """An elementwise function of one 8- or 16-bit tensor (and constants) becomes a lookup table
        (256 or 65536 entries)."""
        args = [_attr(self.gm, a.target) if isinstance(a, Node) and a.op == "get_attr" else a for a in node.args]
        if node.target in MUL and len(args) == 2 and not isinstance(args[0], Node):
            args.reverse()  # constant * x: the same float32 product as x * constant
        tensors = [a for a in args if isinstance(a, Node)]
        kwargs = dict(node.kwargs)
        if len(tensors) != 1 or args[0] is not tensors[0] or any(
                not isinstance(v, (int, float, str)) for v in kwargs.values()):
            return False
        xq = _QParams.of(tensors[0])
        quant = _single_user(node)
        yq = _QParams.of(quant) if quant is not None and quant.target in Q_TENSOR else None
        if xq is None or tensors[0].target not in DQ_TENSOR or xq.dtype not in INTEGER_GRIDS or yq is None:
            return False
        if node.target in MUL | DIV and not (isinstance(args[1], (int, float)) or
                                             (isinstance(args[1], torch.Tensor) and args[1].numel() == 1)):
            return False
        target, rest = node.target, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:])
        table = lookup_table(lambda x: target(x, *rest, **kwargs), xq.scale, xq.zero, xq.qmin, xq.qmax,
                             yq.scale, yq.zero, yq.qmin, yq.qmax, yq.dtype)
        return self.replace(node, quant, int_lookup, (xq.source, self.constant(table, "table", quant), xq.qmin), "table")

    def resample(self, node: Node) -> bool:
        xq = _QParams.of(node.args[0])
        quant = _single_user(node)
        yq = _QParams.of(quant) if quant is not None and quant.target in Q_TENSOR else None
        if xq is None or yq is None or node.args[0].target not in DQ_TENSOR or node.kwargs:
            return False
        if (xq.scale, xq.zero, xq.qmin, xq.qmax) != (yq.scale, yq.zero, yq.qmin, yq.qmax):
            return False
        _, out_size, align_corners, scales = (list(node.args) + [None] * 4)[:4]
        return self.replace(node, quant, int_resample, (
            xq.source, xq.zero, xq.qmin, xq.qmax, yq.dtype, None if out_size is None else tuple(out_size),
            bool(align_corners), None if scales is None else tuple(scales)), "resample")

    def _requantized_by(self, node: Node) -> tuple[Node, "_QParams"] | None:
        quant = _single_user(node)
        yq = _QParams.of(quant) if quant is not None and quant.target in Q_TENSOR else None
        return None if yq is None else (quant, yq)

    def matmul(self, node: Node) -> bool:
        """matmul of two quantized tensors (`int_matmul`)."""
        inputs, out = self._binary_inputs(node), self._requantized_by(node)
        if inputs is None or out is None or any(q.dtype not in INTEGER_GRIDS for q in inputs):
            return False
        (aq, bq), (quant, yq) = inputs, out
        return self.replace(node, quant, int_matmul, (
            aq.source, aq.scale, aq.zero, grid_bound(aq.qmin, aq.qmax, aq.zero),
            bq.source, bq.scale, bq.zero, grid_bound(bq.qmin, bq.qmax, bq.zero),
            yq.scale, yq.zero, yq.qmin, yq.qmax, yq.dtype), "matmul")

    def softmax(self, node: Node) -> bool:
        """softmax of a quantized tensor (`int_softmax`: an exponential table, an exact sum)."""
        xq, out = _QParams.of(node.args[0]), self._requantized_by(node)
        if xq is None or out is None or node.args[0].target not in DQ_TENSOR or xq.dtype not in INTEGER_GRIDS:
            return False
        if len(node.args) > 2 and node.args[2] and node.target == A.softmax.int:
            return False  # a dtype argument: not the plain softmax
        quant, yq = out
        span = xq.qmax - xq.qmin
        table = self.constant(softmax_table(xq.scale, span), "softmax_table", quant)
        return self.replace(node, quant, int_softmax, (
            xq.source, int(node.args[1]), table, span, yq.scale, yq.zero, yq.qmin, yq.qmax, yq.dtype), "softmax")

    def layer_norm(self, node: Node) -> bool:
        """LayerNorm over the last dimension of a quantized tensor (`int_layer_norm`)."""
        xq, out = _QParams.of(node.args[0]), self._requantized_by(node)
        if xq is None or out is None or node.args[0].target not in DQ_TENSOR or xq.dtype not in INTEGER_GRIDS:
            return False
        shape, weight, bias = (list(node.args[1:4]) + [None, None])[:3]
        eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
        if len(shape) != 1 or any(a is not None and not (isinstance(a, Node) and a.op == "get_attr")
                                  for a in (weight, bias)):
            return False
        quant, yq = out
        channels = int(shape[0])
        gamma = torch.ones(channels) if weight is None else _attr(self.gm, weight.target).detach()
        beta = torch.zeros(channels) if bias is None else _attr(self.gm, bias.target).detach()
        gain = gamma.to(torch.float32) / torch.tensor(yq.scale, dtype=torch.float32)
        offset = beta.to(torch.float32) / torch.tensor(yq.scale, dtype=torch.float32)
        return self.replace(node, quant, int_layer_norm, (
            xq.source, xq.zero, layer_norm_epsilon(eps, channels, xq.scale),
            self.constant(gain, "norm_gain", quant), self.constant(offset, "norm_offset", quant),
            yq.zero, yq.qmin, yq.qmax, yq.dtype), "layer_norm")

    def add_float(self, node: Node) -> bool:
        """A quantized tensor plus or minus a float one (a constant bias or mask): `int_add_float`."""
        if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            return False
        a, other = node.args
        subtract = node.target in SUB
        if not subtract and _QParams.of(other) is not None and _QParams.of(a) is None:
            a, other = other, a  # c + x: the same float32 sum
        aq = _QParams.of(a)
        if aq is None or a.target not in DQ_TENSOR or aq.dtype not in INTEGER_GRIDS:
            return False
        if not (isinstance(other, (int, float)) or (isinstance(other, Node) and _QParams.of(other) is None)):
            return False
        _, bounds, quant = _output_quantize(node)
        yq = _QParams.of(quant) if quant is not None else None
        if yq is None:
            return False
        low, high = _grid_bounds(bounds, yq)
        return self.replace(node, quant, int_add_float, (
            aq.source, aq.scale, aq.zero,
            other if isinstance(other, Node) else self.constant(torch.tensor(float(other)), "addend", quant),
            yq.scale, yq.zero, low, high, yq.dtype, subtract), "add")

    def requantize(self, node: Node) -> bool:
        """A quantize of a dequantized tensor onto another grid: a table of the identity."""
        xq, yq = _QParams.of(node.args[0]), _QParams.of(node)
        if xq is None or yq is None or node.args[0].target not in DQ_TENSOR:
            return False
        if (xq.scale, xq.zero, xq.dtype) == (yq.scale, yq.zero, yq.dtype) or xq.dtype not in INTEGER_GRIDS:
            return False
        table = lookup_table(lambda x: x, xq.scale, xq.zero, xq.qmin, xq.qmax,
                             yq.scale, yq.zero, yq.qmin, yq.qmax, yq.dtype)
        return self.replace(node, node, int_lookup, (xq.source, self.constant(table, "table", node), xq.qmin),
                            "requantize")

    def input_quantize(self, node: Node) -> bool:
        q = _QParams.of(node)
        if q is None or not isinstance(q.source, Node) or q.source.op != "placeholder":
            return False
        return self.replace(node, node, quantize_input, (q.source, q.scale, q.zero, q.qmin, q.qmax, q.dtype), "quantize")


def _dead_in_place(node: Node) -> bool:
    """An in-place aten op (`relu_` after a rewritten conv) whose mutated input nothing else reads.

    fx keeps every mutating op alive, so without this the float conv + `relu_` that a rewritten
    conv replaced would still run (unused) on every call.
    """
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or not target._schema.is_mutable:
        return False
    first = node.args[0] if node.args else None
    return isinstance(first, Node) and len(first.users) == 1 and not _is_view(first)


def _is_view(node: Node) -> bool:
    """Whether `node` returns a view of another tensor (`slice`, `select`, `view`...): an in-place
    op on it writes into that tensor (a shifted-window mask filled slice by slice), so it is not dead."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return node.op != "call_function" and node.op != "placeholder"
    return any(ret.alias_info is not None for ret in target._schema.returns)


def integer_program(reference: GraphModule, accumulator_bits: int = 32) -> GraphModule:
    """A copy of the converted (reference) program whose quantized ops compute in integers, with
    conv / linear accumulators of `accumulator_bits` (the march's `QuantRules.accumulator_bits`),
    saturating.

    The copy's `integer_ops` attribute lists what was rewritten; everything else keeps its
    reference (float) form. Layers whose accumulator can saturate are warned about and listed in
    its `accumulator_overflow` attribute (`AccumulatorOverflow` records).
    """
    gm = copy.deepcopy(reference)
    rewriter = _Rewriter(gm, accumulator_bits)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in Q_TENSOR:
            rewriter.input_quantize(node) or rewriter.requantize(node)
        elif node.target in CONV or node.target in LINEAR:
            rewriter.weighted(node)
        elif node.target in GLOBAL_POOL:
            rewriter.global_pool(node)
        elif node.target in AVG_POOL:
            rewriter.avg_pool(node)
        elif node.target in ADD or node.target in SUB:
            rewriter.add(node) or rewriter.add_float(node)
        elif node.target in MATMUL_OPS:
            rewriter.matmul(node)
        elif node.target in SOFTMAX_OPS:
            rewriter.softmax(node)
        elif node.target in LAYER_NORM_OPS:
            rewriter.layer_norm(node)
        elif node.target in MUL:
            rewriter.mul(node) or rewriter.table(node)
        elif node.target in TABLE_OPS or node.target in DIV or node.target in CLAMP_OPS:
            rewriter.table(node)  # a clamp fused into the op before it is gone by now: this one stands alone
        elif node.target in RESAMPLE:
            rewriter.resample(node)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() and not _dead_in_place(n))
    gm.recompile()
    gm.integer_ops = list(rewriter.rewritten)
    gm.accumulator_overflow = list(rewriter.overflows)
    for record in rewriter.overflows:
        warn(record.describe())
    return gm


__all__ = ["integer_program"]
