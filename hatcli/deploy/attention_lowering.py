"""Compile-time lowering of the quantized ops of attention blocks and norms to the sequences the
integer program computes (`hatcli.quant.integer_kernels_nn`): exact integer steps, then
correctly rounded float32 steps, then a QuantizeLinear of scale 1 (round half to even).

- DequantizeLinear x2 -> MatMul -> QuantizeLinear (two activations): the centred integers in
  double, ``MatMul`` (exact), ``Cast`` to float32, ``Mul`` by ``(s_a s_b) / s_y``;
- DequantizeLinear -> Softmax -> QuantizeLinear: ``d = q - ReduceMax(q)`` in int32, ``Gather`` of
  the int32 exponential table (`softmax_table`), ``ReduceSum`` (int32, exact), ``Div``, ``Div`` by ``s_y``;
- DequantizeLinear -> LayerNormalization (last axis, constant scale and bias) -> QuantizeLinear:
  the sums in int64, ``Sqrt``, ``Div``, ``Mul`` by ``γ / s_y``, ``Add`` of ``β / s_y``;
- DequantizeLinear + a float tensor -> Add | Sub (-> Relu | Clip) -> QuantizeLinear:
  ``(float(q) - z) (s_a / s_y) ± c / s_y``.

ONNX Runtime fuses none of these sequences (it would fuse DQ -> MatMul -> Q into QLinearMatMul,
whose rounding depends on the CPU); every step rounds once, the same way on every CPU.
"""

from __future__ import annotations

import numpy as np
import onnx

from hatcli.deploy.accumulator_lowering import Builder
from hatcli.deploy.graph_edit import (
    GRID_TYPES,
    constant_value,
    dequantized_input,
    drop_unused_dequantize,
    grid_clamp,
    index_graph,
    quantized_range,
    replace_nodes,
    requantize_chain,
    scalar_initializer,
)

_MAKE = onnx.helper.make_node
T = onnx.TensorProto


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _requantized(node: onnx.NodeProto, users: dict, outputs: set, initializers: dict,
                 clamps: bool = False) -> tuple[list[onnx.NodeProto], onnx.NodeProto, np.float32] | None:
    """(the op [+ its clamp], its QuantizeLinear onto an 8- or 16-bit grid, that grid's scale)."""
    found = requantize_chain(node, users, outputs)
    if found is None or (len(found[0]) > 1 and not clamps):
        return None
    chain, quant = found
    scale, zero = scalar_initializer(initializers, quant.input[1]), initializers.get(quant.input[2])
    if scale is None or zero is None or zero.data_type not in GRID_TYPES:
        return None
    return chain, quant, np.float32(scale.reshape(()))


def _finish(b: Builder, graph: onnx.GraphProto, value: str, chain: list, quant: onnx.NodeProto) -> None:
    b.nodes.append(_MAKE("QuantizeLinear", [value, b.const(np.float32(1.0), "unit_scale"), quant.input[2]],
                         [quant.output[0]], name=f"{b.stem}_requantize"))
    replace_nodes(graph, [*chain, quant], b.nodes, quant)


def _centred(b: Builder, source: tuple[str, np.float32, int], tag: str, to: int) -> str:
    """``q - z`` of a quantized tensor, in the ONNX type `to` (exact)."""
    numpy_type = onnx.helper.tensor_dtype_to_np_dtype(to)
    return b.op("Sub", [b.op("Cast", [source[0]], f"{tag}_cast", to=to), b.const(numpy_type.type(source[2]), f"{tag}_zero")],
                f"{tag}_centred")


def _matmul(b: Builder, op: onnx.NodeProto, found: tuple, initializers: dict, producers: dict) -> str | None:
    a = dequantized_input(op.input[0], producers, initializers)
    c = dequantized_input(op.input[1], producers, initializers)
    if a is None or c is None:
        return None
    product = b.op("MatMul", [_centred(b, a, "a", T.DOUBLE), _centred(b, c, "b", T.DOUBLE)], "product")
    multiplier = np.float32(np.float32(a[1]) * np.float32(c[1])) / found[2]
    return b.op("Mul", [b.op("Cast", [product], "product_float", to=T.FLOAT),
                        b.const(np.float32(multiplier), "multiplier")], "scaled")


def _softmax(b: Builder, op: onnx.NodeProto, found: tuple, initializers: dict, producers: dict) -> str | None:
    from hatcli.quant.integer_kernels_nn import softmax_table

    source = dequantized_input(op.input[0], producers, initializers)
    zero = None if source is None else initializers.get(producers[op.input[0]].input[2])
    limits = None if zero is None else quantized_range(zero)
    if limits is None:
        return None
    axis = int(_attrs(op).get("axis", -1))
    span = limits[1] - limits[0]
    table = softmax_table(float(source[1]), span).numpy()
    axes = b.const(np.array([axis], dtype=np.int64), "axes")
    x = b.op("Cast", [source[0]], "x_int", to=T.INT32)
    d = b.op("Sub", [x, b.op("ReduceMax", [x, axes], "max", keepdims=1)], "difference")
    index = b.op("Add", [d, b.const(np.int32(span), "span")], "index")
    e = b.op("Gather", [b.const(table, "table"), index], "exp", axis=0)
    total = b.op("ReduceSum", [e, axes], "sum", keepdims=1)
    ratio = b.op("Div", [b.op("Cast", [e], "exp_float", to=T.FLOAT), b.op("Cast", [total], "sum_float", to=T.FLOAT)],
                 "ratio")
    return b.op("Div", [ratio, b.const(found[2], "out_scale")], "scaled")


def _layer_norm(b: Builder, op: onnx.NodeProto, found: tuple, initializers: dict, producers: dict) -> str | None:
    from hatcli.quant.integer_kernels_nn import layer_norm_epsilon

    source = dequantized_input(op.input[0], producers, initializers)
    attrs = _attrs(op)
    gamma = constant_value(op.input[1], initializers, producers) if len(op.input) > 1 else None
    beta = constant_value(op.input[2], initializers, producers) if len(op.input) > 2 and op.input[2] else None
    if source is None or gamma is None or (len(op.input) > 2 and op.input[2] and beta is None):
        return None
    if int(attrs.get("axis", -1)) != -1 or gamma.ndim != 1:
        return None
    channels = int(gamma.size)
    beta = np.zeros(channels, np.float32) if beta is None else beta
    gain = (gamma.astype(np.float32) / found[2]).astype(np.float32)
    offset = (beta.astype(np.float32) / found[2]).astype(np.float32)
    epsilon = np.float32(layer_norm_epsilon(float(attrs.get("epsilon", 1e-5)), channels, float(source[1])))
    axes = b.const(np.array([-1], dtype=np.int64), "axes")
    x = _centred(b, source, "x", T.INT64)
    first = b.op("ReduceSum", [x, axes], "first", keepdims=1)
    second = b.op("ReduceSum", [b.op("Mul", [x, x], "square"), axes], "second", keepdims=1)
    count = b.const(np.int64(channels), "count")
    centred = b.op("Sub", [b.op("Mul", [x, count], "scaled_x"), first], "centred_sum")
    variance = b.op("Sub", [b.op("Mul", [second, count], "scaled_second"), b.op("Mul", [first, first], "first_square")],
                    "variance")
    root = b.op("Sqrt", [b.op("Add", [b.op("Cast", [variance], "variance_float", to=T.FLOAT),
                                      b.const(epsilon, "epsilon")], "variance_eps")], "root")
    normalized = b.op("Div", [b.op("Cast", [centred], "centred_float", to=T.FLOAT), root], "normalized")
    return b.op("Add", [b.op("Mul", [normalized, b.const(gain, "gain")], "gained"), b.const(offset, "offset")],
                "shifted")


def _add_float(b: Builder, op: onnx.NodeProto, found: tuple, initializers: dict, producers: dict) -> str | None:
    first = dequantized_input(op.input[0], producers, initializers)
    second = dequantized_input(op.input[1], producers, initializers)
    if (first is None) == (second is None) or (op.op_type == "Sub" and first is None):
        return None
    source, other = (first, op.input[1]) if first is not None else (second, op.input[0])
    chain, quant, y_scale = found
    grid = grid_clamp(chain, quant, initializers, producers)
    if grid is None:
        return None
    ratio = b.const(np.float32(np.float32(source[1]) / y_scale), "ratio")
    term = b.op("Mul", [_centred(b, source, "a", T.FLOAT), ratio], "scaled")
    addend = b.op("Div", [b.op("Cast", [other], "other_float", to=T.FLOAT), b.const(y_scale, "out_scale")], "addend")
    total = b.op(op.op_type, [term, addend], "total")
    if len(chain) > 1:
        low, high, zero = grid
        total = b.op("Clip", [total, b.const(np.float32(low - zero), "clamp_low"),
                              b.const(np.float32(high - zero), "clamp_high")], "clamped")
    return total


_LOWERINGS = {"MatMul": (_matmul, False), "Softmax": (_softmax, False), "LayerNormalization": (_layer_norm, False),
              "Add": (_add_float, True), "Sub": (_add_float, True)}
"""op type -> (the function writing its sequence, whether a clamp after it is fused)."""


def lower_attention_ops(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite every requantized MatMul of two quantized tensors, Softmax, LayerNormalization, and
    Add / Sub of a quantized and a float tensor as the integer program computes it (see the
    module docstring). Runs after `lower_quantized_binary` (which takes the Add / Sub of two
    quantized tensors). Returns the model (modified in place) and the number of rewritten ops."""
    graph = model.graph
    initializers, producers, users, outputs = index_graph(graph)
    rewritten = 0
    for op in list(graph.node):
        if op.op_type not in _LOWERINGS or len(op.input) < (1 if op.op_type == "Softmax" else 2):
            continue
        if op.op_type == "MatMul" and any(dequantized_input(i, producers, initializers) is None or
                                          producers[i].input[0] in initializers for i in op.input[:2]):
            continue  # a constant operand: a linear layer's
        lower, clamps = _LOWERINGS[op.op_type]
        found = _requantized(op, users, outputs, initializers, clamps)
        if found is None:
            continue
        b = Builder(graph, op.name or op.output[0])
        value = lower(b, op, found, initializers, producers)
        if value is None:
            continue
        _finish(b, graph, value, found[0], found[1])
        rewritten += 1
    if rewritten:
        drop_unused_dequantize(graph)
    return model, rewritten


__all__ = ["lower_attention_ops"]
