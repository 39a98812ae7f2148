"""Compile-time lowering of the convs and Gemms no integer kernel of ONNX Runtime computes the way
the integer program does: to the exact accumulator and explicit float32 steps.

A conv / Gemm with 8-bit weights is left to QLinearConv / QGemm (`hatcli.deploy.kernel_fusion`)
when it reads an 8-bit tensor and is requantized onto an 8-bit grid. Every other one is written
here as `int_weighted` computes it:

- the accumulator ``sum((q_x - z_x) * (q_w - z_w)) + q_bias`` exactly, in int64: ConvInteger /
  MatMulInteger of 8-bit operands; an int16 input is split into its high and low bytes (two
  8-bit products, ``256 * high + low``), since no integer kernel takes int16;
- held in the march's accumulator (`QuantRules.accumulator_bits`, saturating) where it can leave it;
- cast to float32 once and multiplied by the float32 per-channel ``s_x * s_w`` (a float result:
  a graph output, or a float op after it) or ``(s_x * s_w) / s_y`` then clamped and rounded by
  a QuantizeLinear of scale 1 (an int16 output grid).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from hatcli.deploy.graph_edit import (
    EIGHT_BIT,
    accumulator_worst_case,
    add_constant,
    constant_dequantize,
    dequantized_input,
    drop_unused_dequantize,
    grid_clamp,
    index_graph,
    kernel_requantized,
    replace_nodes,
    requantize_chain,
    scalar_initializer,
    trans_b,
    weighted_operands,
)
from hatcli.quant.bias_range import accumulator_bound

_MAKE = onnx.helper.make_node
_SIXTEEN_BIT = (onnx.TensorProto.INT16, onnx.TensorProto.UINT16)


class Builder:
    """Nodes and constants for one rewritten op, named after it."""

    def __init__(self, graph: onnx.GraphProto, stem: str) -> None:
        self.graph, self.stem, self.nodes = graph, stem, []

    def const(self, value: np.ndarray, tag: str) -> str:
        return add_constant(self.graph, np.asarray(value), f"{self.stem}_{tag}")

    def op(self, op_type: str, inputs: list[str], tag: str, **attrs) -> str:
        out = f"{self.stem}_{tag}"
        self.nodes.append(_MAKE(op_type, inputs, [out], name=out, **attrs))
        return out


def _unsigned_weights(b: Builder, q_w: np.ndarray, zero: onnx.TensorProto) -> tuple[str, str]:
    """(weights, zero point) as uint8: the exact U8U8 integer kernels (one zero point for all)."""
    zeros = numpy_helper.to_array(zero).reshape(-1).astype(np.int16)
    if zero.data_type == onnx.TensorProto.INT8:
        q_w, zeros = q_w.astype(np.int16) + 128, zeros + 128
    return b.const(q_w.astype(np.uint8), "weight_u8"), b.const(np.uint8(zeros[0]), "weight_zero")


def _products(b: Builder, kind: str, x: str, x_zero: str, weight: str, w_zero: str, attrs: list, tag: str) -> str:
    """The int64 sum of products of one 8-bit operand `x` with the weights."""
    if kind == "Conv":
        node = _MAKE("ConvInteger", [x, weight, x_zero, w_zero], [f"{b.stem}_{tag}"], name=f"{b.stem}_{tag}")
        node.attribute.extend(attrs)
        b.nodes.append(node)
        acc = node.output[0]
    else:
        acc = b.op("MatMulInteger", [x, weight, x_zero, w_zero], tag)
    return b.op("Cast", [acc], f"{tag}64", to=onnx.TensorProto.INT64)


def exact_accumulator(b: Builder, kind: str, source: tuple[str, np.float32, int], x_zero: onnx.TensorProto,
                 x_zero_name: str, weight: str, w_zero: str, attrs: list) -> str:
    """The exact int64 accumulator of `source` (8- or 16-bit: split into bytes) times the uint8
    `weight` (ConvInteger with the Conv attributes `attrs`, or MatMulInteger); padding reads as
    the input's zero point, so it adds nothing."""
    if x_zero.data_type in EIGHT_BIT:
        return _products(b, kind, source[0], x_zero_name, weight, w_zero, attrs, "acc")
    # int16: u = q - z + 32768 in [0, 65535]; q - z = 256 * (u // 256 - 128) + u % 256
    offset = b.op("Sub", [b.op("Cast", [source[0]], "x_int", to=onnx.TensorProto.INT32),
                          b.const(np.int32(source[2] - 32768), "x_offset")], "x_unsigned")
    high = b.op("Div", [offset, b.const(np.int32(256), "byte")], "x_high")
    low = b.op("Sub", [offset, b.op("Mul", [high, f"{b.stem}_byte"], "x_high_bytes")], "x_low")
    high_u8 = b.op("Cast", [high], "x_high_u8", to=onnx.TensorProto.UINT8)
    low_u8 = b.op("Cast", [low], "x_low_u8", to=onnx.TensorProto.UINT8)
    high_acc = _products(b, kind, high_u8, b.const(np.uint8(128), "high_zero"), weight, w_zero, attrs, "high_acc")
    low_acc = _products(b, kind, low_u8, b.const(np.uint8(0), "low_zero"), weight, w_zero, attrs, "low_acc")
    return b.op("Add", [b.op("Mul", [high_acc, b.const(np.int64(256), "byte64")], "high_scaled"), low_acc], "acc")


def lower_exact_weighted(model: onnx.ModelProto, accumulator_bits: int = 32) -> tuple[onnx.ModelProto, int]:
    """Rewrite every Conv / Gemm (8-bit constant weights, int32 bias) that reads a quantized tensor
    and that no 8-bit integer kernel computes (`kernel_requantized`) as the exact accumulator and
    the float32 steps of the integer program (see the module docstring). Runs after
    `lower_int8_to_uint8`. Returns the model (modified in place) and the number of rewritten ops."""
    graph = model.graph
    initializers, producers, users, outputs = index_graph(graph)
    rewritten = 0
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                       or attrs.get("beta", 1.0) != 1.0):
            continue
        ops = weighted_operands(node, producers, initializers)
        x_zero = None if ops is None else initializers.get(ops.x_dq.input[2])
        if ops is None or x_zero is None or x_zero.data_type not in (*EIGHT_BIT, *_SIXTEEN_BIT):
            continue
        if kernel_requantized(node, users, outputs, initializers, producers):
            continue
        q_w, w_scale, w_zero = ops.weight
        if np.unique(numpy_helper.to_array(w_zero)).size != 1:
            continue  # the integer kernels take one weight zero point
        b = Builder(graph, node.name or node.output[0])
        gemm = node.op_type == "Gemm"
        if gemm and not trans_b(node):
            q_w = q_w.T  # [K, N] -> [N, K]: one layout below
        channels = q_w.shape[0]
        weight, w_zero_name = _unsigned_weights(b, q_w.T if gemm else q_w, w_zero)
        conv_attrs = [] if gemm else list(node.attribute)
        acc = exact_accumulator(b, node.op_type, ops.source, x_zero, ops.x_dq.input[2], weight, w_zero_name, conv_attrs)
        channel_shape = (1, channels) + (() if gemm else (1,) * (q_w.ndim - 2))  # conv1d / conv2d
        if ops.bias is not None:
            acc = b.op("Add", [acc, b.const(ops.bias.astype(np.int64).reshape(channel_shape), "bias")], "biased")
        limit = 2 ** (accumulator_bits - 1)
        product = (np.float32(ops.source[1]) * w_scale.astype(np.float32).reshape(-1)).astype(np.float32)
        _finish(b, acc, accumulator_worst_case(ops, x_zero, node)[0] > limit - 1, limit, product, channel_shape,
                [node], (initializers, producers, users, outputs))
        rewritten += 1
    if rewritten:
        drop_unused_dequantize(graph)
    return model, rewritten


def _finish(b: Builder, acc: str, saturate: bool, limit: int, product: np.ndarray, channel_shape: tuple[int, ...],
            replaced: list[onnx.NodeProto], index: tuple[dict, dict, dict, set]) -> None:
    """The tail every exact-accumulator lowering shares: the march's saturation (when the worst case
    can pass it), one cast to float32, then the per-channel multiplier and a QuantizeLinear of scale
    1 onto the grid of the requantize chain that follows (clamped where the chain clamps), or the
    dequantized accumulator where none follows. `replaced` are the nodes the accumulator computes
    (the op, and its bias Add), the last of them the one whose output is read."""
    initializers, producers, users, outputs = index
    graph, last = b.graph, replaced[-1]
    if saturate:
        acc = b.op("Clip", [acc, b.const(np.int64(-limit), "acc_min"), b.const(np.int64(limit - 1), "acc_max")],
                   "saturated")
    acc_float = b.op("Cast", [acc], "acc_float", to=onnx.TensorProto.FLOAT)
    found = requantize_chain(last, users, outputs)
    grid = None if found is None else grid_clamp(*found, initializers, producers)
    if grid is None:
        b.nodes.append(_MAKE("Mul", [acc_float, b.const(product.reshape(channel_shape), "dequantize")],
                             [last.output[0]], name=f"{b.stem}_dequantize"))
        replace_nodes(graph, replaced, b.nodes, last)
        return
    chain, quant = found
    y_scale = scalar_initializer(initializers, quant.input[1])
    multiplier = (product / np.float32(y_scale.reshape(()))).astype(np.float32)
    scaled = b.op("Mul", [acc_float, b.const(multiplier.reshape(channel_shape), "multiplier")], "scaled")
    if len(chain) > 1:
        low, high, zero = grid
        scaled = b.op("Clip", [scaled, b.const(np.float32(low - zero), "clamp_low"),
                               b.const(np.float32(high - zero), "clamp_high")], "clamped")
    b.nodes.append(_MAKE("QuantizeLinear", [scaled, b.const(np.float32(1.0), "unit_scale"), quant.input[2]],
                         [quant.output[0]], name=f"{b.stem}_requantize"))
    replace_nodes(graph, [*replaced, *chain[1:], quant], b.nodes, quant)


def _matmul_weight(name: str, producers: dict, initializers: dict) -> tuple[np.ndarray, np.ndarray, onnx.TensorProto] | None:
    """(int8 weights [out, in], per-output scales, zero point) of a linear layer's MatMul operand:
    ``Transpose(DequantizeLinear(q_w [out, in], axis 0))``, as torch exports `F.linear` on a tensor
    of more than two dimensions; None for any other operand."""
    transpose = producers.get(name)
    if transpose is None or transpose.op_type != "Transpose":
        return None
    perm = next((list(onnx.helper.get_attribute_value(a)) for a in transpose.attribute if a.name == "perm"), None)
    found = constant_dequantize(transpose.input[0], producers, initializers)
    if perm != [1, 0] or found is None or found[0].ndim != 2 or found[2].data_type not in EIGHT_BIT:
        return None
    dq = producers[transpose.input[0]]
    axis = next((int(onnx.helper.get_attribute_value(a)) for a in dq.attribute if a.name == "axis"), 1)
    if found[1].size > 1 and axis != 0:
        return None
    return found


def lower_weighted_matmul(model: onnx.ModelProto, accumulator_bits: int = 32) -> tuple[onnx.ModelProto, int]:
    """Rewrite every linear layer torch exported as ``MatMul(DequantizeLinear(x), weight) [+ Add of
    its int32 bias]`` (a linear on a tensor of more than two dimensions: a transformer's
    channels-last tokens) as `int_weighted` computes it: the exact accumulator (MatMulInteger of
    8-bit operands, int16 split into bytes), the bias in int64, the march's saturation, one cast
    to float32, the per-channel multiplier, a QuantizeLinear of scale 1 (or the dequantized
    accumulator where no quantize follows). Returns the model (modified in place) and the number
    of rewritten layers."""
    graph = model.graph
    initializers, producers, users, outputs = index_graph(graph)
    rewritten = 0
    for node in list(graph.node):
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        source = dequantized_input(node.input[0], producers, initializers)
        weight = _matmul_weight(node.input[1], producers, initializers)
        x_zero = None if source is None else initializers.get(producers[node.input[0]].input[2])
        if source is None or weight is None or x_zero is None or x_zero.data_type not in (*EIGHT_BIT, *_SIXTEEN_BIT):
            continue
        q_w, w_scale, w_zero = weight
        if np.unique(numpy_helper.to_array(w_zero)).size != 1:
            continue
        last, bias = node, None
        readers = users.get(node.output[0], [])
        if len(readers) == 1 and readers[0].op_type == "Add" and node.output[0] not in outputs:
            other = next(i for i in readers[0].input if i != node.output[0])
            found = constant_dequantize(other, producers, initializers)
            if found is not None and found[2].data_type == onnx.TensorProto.INT32 and not np.any(
                    numpy_helper.to_array(found[2])):
                last, bias = readers[0], found[0]
        b = Builder(graph, node.name or node.output[0])
        weight_u8, w_zero_name = _unsigned_weights(b, q_w.T, w_zero)
        acc = exact_accumulator(b, "MatMul", source, x_zero, producers[node.input[0]].input[2], weight_u8,
                                w_zero_name, [])
        if bias is not None:
            acc = b.op("Add", [acc, b.const(bias.astype(np.int64).reshape(-1), "bias")], "biased")
        limit = 2 ** (accumulator_bits - 1)
        info = np.iinfo(onnx.helper.tensor_dtype_to_np_dtype(x_zero.data_type))
        x_bound = max(abs(int(info.min) - source[2]), abs(int(info.max) - source[2]))
        centred = q_w.astype(np.int64) - int(numpy_helper.to_array(w_zero).reshape(-1)[0])
        bias_bound = 0 if bias is None else int(np.abs(bias.astype(np.int64)).max(initial=0))
        product = (np.float32(source[1]) * w_scale.astype(np.float32).reshape(-1)).astype(np.float32)
        _finish(b, acc, accumulator_bound(centred, x_bound, bias_bound) > limit - 1, limit, product, (-1,),
                [node, *([] if last is node else [last])], (initializers, producers, users, outputs))
        rewritten += 1
    if rewritten:
        drop_unused_dequantize(graph)
    return model, rewritten
