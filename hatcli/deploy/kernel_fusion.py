"""The QDQ fusions ONNX Runtime makes at `--opt 2` and `3` (DequantizeLinear -> Conv / Gemm
[-> Relu] -> QuantizeLinear into QLinearConv / QGemm), made by the compiler for `--opt 0` and `1`,
where ONNX Runtime fuses nothing and would run float convs of dequantized values instead, and at
every level for the fused clamps ONNX Runtime cannot fold into the requantization (ReLU6,
hardtanh, clamp: a Clip; a Relu above the output's minimum): the integer kernel, then an integer
Clip at the clamp's bounds on the output grid (`hatcli.quant.clamps`, as the integer program
computes them). So every optimization level runs the same integer kernels."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from hatcli.deploy.graph_edit import (
    MS_DOMAIN,
    add_constant,
    drop_unused_dequantize,
    grid_clamp,
    index_graph,
    kernel_requantized,
    quantized_range,
    replace_nodes,
    requantize_chain,
    use_ms_domain,
    weighted_operands,
)


def _clamp_tail(graph: onnx.GraphProto, chain: list[onnx.NodeProto], quant: onnx.NodeProto,
                initializers: dict, producers: dict, stem: str) -> tuple[str, list[onnx.NodeProto]] | None:
    """Where the fused integer op of `chain` (weighted op [+ clamp]) -> `quant` writes, and the
    nodes that follow it: none when there is no clamp or the clamp's bounds on the output grid are
    the saturation; else an integer Clip at those bounds. None when the output grid or the bounds
    are not constants."""
    grid = grid_clamp(chain, quant, initializers, producers)
    if grid is None:
        return None
    low, high, _ = grid
    zero = initializers[quant.input[2]]
    if (low, high) == quantized_range(zero):
        return quant.output[0], []
    dtype = numpy_helper.to_array(zero).dtype
    unclamped = f"{stem}_unclamped"
    clip = onnx.helper.make_node("Clip", [unclamped, add_constant(graph, np.array(low, dtype), f"{stem}_clamp_low"),
                                          add_constant(graph, np.array(high, dtype), f"{stem}_clamp_high")],
                                 [quant.output[0]], name=f"{stem}_clamp")
    return unclamped, [clip]


def _left_to_runtime(chain: list[onnx.NodeProto], quant: onnx.NodeProto, initializers: dict) -> bool:
    """Whether ONNX Runtime's own QDQ fusion computes `chain` -> `quant` exactly: no clamp, or a
    Relu whose bound is the output's saturation (its zero point is the type's minimum)."""
    if len(chain) == 1:
        return True
    zero = initializers.get(quant.input[2])
    limits = None if zero is None else quantized_range(zero)
    return (chain[1].op_type == "Relu" and limits is not None
            and int(numpy_helper.to_array(zero).reshape(())) == limits[0])


def lower_quantized_conv(model: onnx.ModelProto, clamped_only: bool = False) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear -> Conv (8-bit per-channel weights, int32 bias) [-> Relu | Clip] ->
    QuantizeLinear by one QLinearConv [-> integer Clip].

    Without `clamped_only`, for the optimization levels at which ONNX Runtime does not fuse the
    pattern itself (`--opt 0` and `1`: it would run a float Conv of the dequantized values, whose
    sums and requantization round differently from the integer program); the node is the one
    ONNX Runtime's own fusion builds at `--opt 2` and `3`, so every level runs the same integer
    kernel. With `clamped_only` (`--opt 2`, `3`) only the chains ONNX Runtime cannot fuse exactly
    (`_left_to_runtime`) are replaced. A clamp whose bounds on the output grid are the
    saturation is dropped; other clamps become an integer Clip. Returns the model (modified in
    place) and the number of fused convs.
    """
    graph = model.graph
    initializers, producers, users, outputs = index_graph(graph)
    fused = 0
    for conv in list(graph.node):
        ops = weighted_operands(conv, producers, initializers) if conv.op_type == "Conv" else None
        found = None if ops is None else requantize_chain(conv, users, outputs)
        if ops is None or found is None:
            continue
        chain, quant = found
        if not kernel_requantized(conv, users, outputs, initializers, producers):
            continue
        if clamped_only and _left_to_runtime(chain, quant, initializers):
            continue
        stem = conv.name or conv.output[0]
        tail = _clamp_tail(graph, chain, quant, initializers, producers, stem)
        if tail is None:
            continue
        target, clamp = tail
        inputs = [*ops.x_dq.input[:3], *ops.w_dq.input[:3], quant.input[1], quant.input[2]]
        if ops.b_dq is not None:
            inputs.append(ops.b_dq.input[0])
        node = onnx.helper.make_node("QLinearConv", inputs, [target], name=f"{stem}_qlinear")
        node.attribute.extend(conv.attribute)
        replace_nodes(graph, [*chain, quant], [node, *clamp], quant)
        fused += 1
    if fused:
        drop_unused_dequantize(graph)
    return model, fused


def lower_quantized_gemm(model: onnx.ModelProto, clamped_only: bool = False) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear -> Gemm (8-bit weights, int32 bias) [-> Relu | Clip] ->
    QuantizeLinear by one QGemm (ONNX Runtime's contrib op) [-> integer Clip], for the levels and
    chains `lower_quantized_conv` fuses (`clamped_only` as there). Returns the model (modified in
    place) and the number of fused Gemms."""
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
        stem = gemm.name or gemm.output[0]
        inputs = [*ops.x_dq.input[:3], *ops.w_dq.input[:3], ops.b_dq.input[0] if ops.b_dq is not None else ""]
        found = requantize_chain(gemm, users, outputs)
        if found is None or not kernel_requantized(gemm, users, outputs, initializers, producers):
            continue  # a float result: `hatcli.deploy.accumulator_lowering`
        chain, quant = found
        if clamped_only and _left_to_runtime(chain, quant, initializers):
            continue
        tail = _clamp_tail(graph, chain, quant, initializers, producers, stem)
        if tail is None:
            continue
        (target, clamp), old = tail, [*chain, quant]
        inputs += [quant.input[1], quant.input[2]]
        node = onnx.helper.make_node("QGemm", inputs, [target], name=f"{stem}_qgemm",
                                     domain=MS_DOMAIN, transB=int(attrs.get("transB", 0)))
        replace_nodes(graph, old, [node, *clamp], old[-1])
        fused += 1
    if fused:
        drop_unused_dequantize(graph)
        use_ms_domain(model)
    return model, fused
