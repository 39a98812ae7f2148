"""The QDQ fusions ONNX Runtime makes at `--opt 2` and `3` (DequantizeLinear -> Conv / Gemm ->
QuantizeLinear into QLinearConv / QGemm), made by the compiler for `--opt 0` and `1`, where
ONNX Runtime fuses nothing and would run float convs of dequantized values instead: so every
optimization level runs the same integer kernels."""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from hatcli.deploy.graph_edit import (
    MS_DOMAIN,
    drop_unused_dequantize,
    index_graph,
    replace_nodes,
    requantize_chain,
    use_ms_domain,
    weighted_operands,
)


def lower_quantized_conv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear -> Conv (8-bit per-channel weights, int32 bias) [-> Relu] ->
    QuantizeLinear by one QLinearConv, for the optimization levels at which ONNX Runtime does not
    fuse the pattern itself (`--opt 0` and `1`: it would run a float Conv of the dequantized
    values, whose sums and requantization round differently from the integer program).

    The node is the one ONNX Runtime's own fusion builds at `--opt 2` and `3`, so every level
    runs the same integer kernel. A Relu is dropped only where the output's zero point is its
    type's minimum (the clamp at real 0 is then the saturation); other patterns are left as they
    are. Returns the model (modified in place) and the number of fused convs.
    """
    graph = model.graph
    initializers, producers, users, outputs = index_graph(graph)
    type_min = {onnx.TensorProto.UINT8: 0, onnx.TensorProto.INT8: -128}
    fused = 0
    for conv in list(graph.node):
        ops = weighted_operands(conv, producers, initializers) if conv.op_type == "Conv" else None
        found = None if ops is None else requantize_chain(conv, users, outputs)
        if ops is None or found is None:
            continue
        chain, quant = found
        y_zero = initializers.get(quant.input[2])
        if y_zero is None or y_zero.data_type not in type_min:
            continue
        if len(chain) > 1 and int(numpy_helper.to_array(y_zero).reshape(())) != type_min[y_zero.data_type]:
            continue  # the Relu is not the output's saturation
        inputs = [*ops.x_dq.input[:3], *ops.w_dq.input[:3], quant.input[1], quant.input[2]]
        if ops.b_dq is not None:
            inputs.append(ops.b_dq.input[0])
        stem = conv.name or conv.output[0]
        node = onnx.helper.make_node("QLinearConv", inputs, [quant.output[0]], name=f"{stem}_qlinear")
        node.attribute.extend(conv.attribute)
        replace_nodes(graph, [*chain, quant], [node], quant)
        fused += 1
    if fused:
        drop_unused_dequantize(graph)
    return model, fused


def lower_quantized_gemm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear -> Gemm (8-bit weights, int32 bias) [-> QuantizeLinear] by one
    QGemm (ONNX Runtime's contrib op; a float output where no QuantizeLinear follows), for the
    levels at which ONNX Runtime does not fuse the pattern itself (see `lower_quantized_conv`).
    Returns the model (modified in place) and the number of fused Gemms."""
    graph = model.graph
    initializers, producers, users, outputs = index_graph(graph)
    fused = 0
    for gemm in list(graph.node):
        if gemm.op_type != "Gemm":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        ops = weighted_operands(gemm, producers, initializers)
        if ops is None:
            continue
        inputs = [*ops.x_dq.input[:3], *ops.w_dq.input[:3], ops.b_dq.input[0] if ops.b_dq is not None else ""]
        nxt = users.get(gemm.output[0], [])
        quant = nxt[0] if len(nxt) == 1 and nxt[0].op_type == "QuantizeLinear" and gemm.output[0] not in outputs else None
        if quant is not None:
            inputs += [quant.input[1], quant.input[2]]
        elif any(node.op_type == "QuantizeLinear" for node in nxt):
            continue
        stem = gemm.name or gemm.output[0]
        node = onnx.helper.make_node("QGemm", inputs, [(quant or gemm).output[0]], name=f"{stem}_qgemm",
                                     domain=MS_DOMAIN, transB=int(attrs.get("transB", 0)))
        replace_nodes(graph, [gemm] + ([quant] if quant is not None else []), [node], quant or gemm)
        fused += 1
    if fused:
        drop_unused_dequantize(graph)
        use_ms_domain(model)
    return model, fused
