"""Small graph-editing helpers that the compile-time rewrites (`hatcli.deploy.lowering`,
`hatcli.deploy.table_lowering`, `hatcli.deploy.kernel_fusion`) share: index a graph, read a
tensor's quantization parameters, splice nodes in and out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from hatcli.quant.bias_range import accumulator_bound
from hatcli.quant.clamps import ONNX_CLAMPS, ClampBounds

MS_DOMAIN = "com.microsoft"
"""ONNX Runtime's contrib-op domain (QLinearGlobalAveragePool, QGemm, ...)."""


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each tensor, by tensor name."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def index_graph(graph: onnx.GraphProto) -> tuple[dict, dict, dict, set]:
    """(initializers by name, producer of each tensor, consumers of each tensor, graph outputs)."""
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    return initializers, producers, consumers(graph), {o.name for o in graph.output}


def scalar_initializer(initializers: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    """The value of a one-element initializer `name`, or None when it is absent or not a scalar."""
    tensor = initializers.get(name)
    if tensor is None:
        return None
    value = numpy_helper.to_array(tensor)
    return value if value.size == 1 else None


def dequantized_input(name: str, producers: dict[str, onnx.NodeProto],
                      initializers: dict[str, onnx.TensorProto]) -> tuple[str, np.float32, int] | None:
    """(quantized tensor, scale, zero point) behind a per-tensor DequantizeLinear output."""
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
        return None
    scale, zero = scalar_initializer(initializers, dq.input[1]), scalar_initializer(initializers, dq.input[2])
    if scale is None or zero is None:
        return None
    return dq.input[0], np.float32(scale.reshape(())), int(zero.reshape(()))


def requantize_chain(node: onnx.NodeProto, users: dict, outputs: set) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    """(node [+ its fused clamp: Relu or Clip], the QuantizeLinear that ends the chain) when
    `node`'s result is requantized; None otherwise."""
    chain = [node]
    nxt = users.get(node.output[0], [])
    if len(nxt) == 1 and nxt[0].op_type in ONNX_CLAMPS and node.output[0] not in outputs:
        chain.append(nxt[0])
        nxt = users.get(nxt[0].output[0], [])
    if len(nxt) != 1 or nxt[0].op_type != "QuantizeLinear" or chain[-1].output[0] in outputs:
        return None
    if len(nxt[0].input) < 3:
        return None
    return chain, nxt[0]


def kernel_requantized(node: onnx.NodeProto, users: dict, outputs: set, initializers: dict, producers: dict) -> bool:
    """Whether a Conv / Gemm `node` reads an 8-bit tensor and is requantized (after a clamp of
    constant bounds, if any) onto an 8-bit grid: what QLinearConv / QGemm compute, fused by
    `hatcli.deploy.kernel_fusion` or by ONNX Runtime. Every other conv / Gemm is lowered by
    `hatcli.deploy.accumulator_lowering`."""
    source = producers.get(node.input[0])
    x_zero = None if source is None or len(source.input) < 3 else initializers.get(source.input[2])
    found = requantize_chain(node, users, outputs)
    if x_zero is None or x_zero.data_type not in EIGHT_BIT or found is None:
        return False
    chain, quant = found
    y_zero = initializers.get(quant.input[2])
    if y_zero is None or y_zero.data_type not in EIGHT_BIT:
        return False
    return len(chain) == 1 or onnx_clamp_bounds(chain[1], initializers, producers) is not None


def onnx_clamp_bounds(node: onnx.NodeProto, initializers: dict, producers: dict) -> ClampBounds | None:
    """The bounds of a Relu or Clip node (Clip's from its constant inputs, or its attributes before
    opset 11); None when a bound is not a constant."""
    if node.op_type == "Relu":
        return ClampBounds(0.0, None)
    if node.op_type != "Clip":
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bounds: list[float | None] = [attrs.get("min"), attrs.get("max")]
    for index in (1, 2):
        if len(node.input) > index and node.input[index]:
            value = constant_value(node.input[index], initializers, producers)
            if value is None or value.size != 1:
                return None
            bounds[index - 1] = float(value.reshape(()))
    low, high = (None if b is None or abs(b) >= np.finfo(np.float32).max else float(b) for b in bounds)
    return ClampBounds(low, high)


GRID_TYPES = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT16, onnx.TensorProto.INT16)
"""The integer types of a quantized grid (8- and 16-bit)."""


def quantized_range(zero_point: onnx.TensorProto) -> tuple[int, int] | None:
    """(qmin, qmax) of the 8- or 16-bit type of a zero-point initializer; None for other types."""
    if zero_point.data_type not in GRID_TYPES:
        return None
    info = np.iinfo(onnx.helper.tensor_dtype_to_np_dtype(zero_point.data_type))
    return int(info.min), int(info.max)


def grid_clamp(chain: list[onnx.NodeProto], quant: onnx.NodeProto, initializers: dict,
               producers: dict) -> tuple[int, int, int] | None:
    """(low, high, zero point) on the grid of `quant`, the QuantizeLinear ending `chain` (an op
    [+ its fused clamp]): the clamp's bounds quantized as the integer program does
    (`ClampBounds.on_grid`), the grid's range without a clamp. None where the grid's scale or
    zero point, or a bound, is not a constant."""
    scale, zero = scalar_initializer(initializers, quant.input[1]), initializers.get(quant.input[2])
    limits = None if zero is None else quantized_range(zero)
    if scale is None or limits is None:
        return None
    bounds = ClampBounds(None, None) if len(chain) == 1 else onnx_clamp_bounds(chain[1], initializers, producers)
    if bounds is None:
        return None
    z = int(numpy_helper.to_array(zero).reshape(()))
    return (*bounds.on_grid(float(scale.reshape(())), z, *limits), z)


def trans_b(node: onnx.NodeProto) -> int:
    """A Gemm's `transB` attribute (0 when absent)."""
    return next((int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "transB"), 0)


def replace_nodes(graph: onnx.GraphProto, old: list[onnx.NodeProto], new: list[onnx.NodeProto], anchor: onnx.NodeProto) -> None:
    """Put `new` where `anchor` stands in the node list (keeping the topological order) and remove `old`."""
    position = list(graph.node).index(anchor)
    for offset, node in enumerate(new):
        graph.node.insert(position + offset, node)
    for node in old:
        graph.node.remove(node)


def add_constant(graph: onnx.GraphProto, value: np.ndarray, name: str) -> str:
    """Add `value` as an initializer called `name`; returns the name, for use as a node input."""
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def drop_unused_dequantize(graph: onnx.GraphProto) -> None:
    """Remove every DequantizeLinear whose output nothing reads any more (left over by a rewrite)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]:
        graph.node.remove(node)


def constant_value(name: str, initializers: dict, producers: dict) -> np.ndarray | None:
    """The value of tensor `name` when it is an initializer or a Constant node's output, else None."""
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
    return None


def constant_dequantize(name: str, producers: dict, initializers: dict) -> tuple[np.ndarray, np.ndarray, onnx.TensorProto] | None:
    """(quantized values, scale, zero-point tensor) of a DequantizeLinear of initializers."""
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
        return None
    if not all(i in initializers for i in dq.input[:3]):
        return None
    return (numpy_helper.to_array(initializers[dq.input[0]]), numpy_helper.to_array(initializers[dq.input[1]]),
            initializers[dq.input[2]])


def use_ms_domain(model: onnx.ModelProto) -> None:
    """Declare ONNX Runtime's contrib-op domain in `model`'s opsets (once) for a node added in it."""
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


EIGHT_BIT = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)


@dataclass(frozen=True)
class WeightedOperands:
    """The quantized operands of a Conv / Gemm (see `weighted_operands`)."""

    source: tuple[str, np.float32, int]
    """The quantized input tensor, its scale and zero point."""
    x_dq: onnx.NodeProto
    weight: tuple[np.ndarray, np.ndarray, onnx.TensorProto]
    """The quantized weights, their scales and zero-point tensor."""
    w_dq: onnx.NodeProto
    bias: np.ndarray | None
    """The int32 quantized bias, or None without one."""
    b_dq: onnx.NodeProto | None


def _axis(dq: onnx.NodeProto) -> int:
    return next((int(onnx.helper.get_attribute_value(a)) for a in dq.attribute if a.name == "axis"), 1)


def _output_axis(node: onnx.NodeProto, ndim: int) -> int:
    """The weight axis of a Conv / Gemm's output channels."""
    if node.op_type != "Gemm":
        return 0
    return 0 if trans_b(node) else ndim - 1


def weighted_operands(node: onnx.NodeProto, producers: dict, initializers: dict) -> WeightedOperands | None:
    """The operands of a Conv / Gemm `node` that reads a per-tensor DequantizeLinear input,
    constant 8-bit weights and, if it has one, a constant int32 bias with zero point 0 (what an
    integer kernel takes); None for any other node."""
    if len(node.input) < 2:
        return None
    source = dequantized_input(node.input[0], producers, initializers)
    weight = constant_dequantize(node.input[1], producers, initializers)
    if source is None or weight is None or weight[2].data_type not in EIGHT_BIT:
        return None
    if weight[1].size > 1 and _axis(producers[node.input[1]]) != _output_axis(node, weight[0].ndim):
        return None  # scales per input channel: no integer kernel takes them
    bias = b_dq = None
    if len(node.input) > 2 and node.input[2]:
        found = constant_dequantize(node.input[2], producers, initializers)
        if found is None or found[2].data_type != onnx.TensorProto.INT32 or np.any(numpy_helper.to_array(found[2])):
            return None
        bias, b_dq = found[0], producers[node.input[2]]
    return WeightedOperands(source, producers[node.input[0]], weight, producers[node.input[1]], bias, b_dq)


def static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """The inferred shape of every tensor of `model` (None for a free dimension)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def accumulator_worst_case(ops: WeightedOperands, x_zero: onnx.TensorProto, node: onnx.NodeProto) -> tuple[int, int]:
    """(the largest |accumulator|, the fan-in) of the Conv / Gemm `node` with these operands and
    this input zero point: the input's range times the largest per-channel sum of |q_w - z_w|,
    plus the largest |bias| (`hatcli.quant.bias_range.accumulator_bound`)."""
    info = np.iinfo(onnx.helper.tensor_dtype_to_np_dtype(x_zero.data_type))
    z = ops.source[2]
    q_w = ops.weight[0].astype(np.int64) - int(numpy_helper.to_array(ops.weight[2]).reshape(-1)[0])
    if node.op_type == "Gemm" and not trans_b(node):
        q_w = q_w.T  # [K, N] -> [N, K]
    centred = q_w.reshape(q_w.shape[0], -1)
    bias = 0 if ops.bias is None else int(np.abs(ops.bias.astype(np.int64)).max(initial=0))
    x_bound = max(abs(int(info.min) - z), abs(int(info.max) - z))
    return accumulator_bound(centred, x_bound, bias), int(centred.shape[1])
