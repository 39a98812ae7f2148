"""Compile-time lowering of an 8-bit average pool to the integer program's arithmetic.

DequantizeLinear -> AveragePool -> QuantizeLinear becomes the exact integer sum of each window
(a ConvInteger of ones, one group per channel, padding at the input's zero point; a 16-bit input
split into bytes, `hatcli.deploy.accumulator_lowering.exact_accumulator`), times the
float32 multiplier of its position, and a QuantizeLinear of scale 1: what `int_avg_pool`
computes. ONNX Runtime would otherwise fuse the pattern into QLinearAveragePool at `--opt 2` and
`3` and run a float AveragePool at `0` and `1`, neither of which the integer program can
reproduce (nor, with `ceil_mode`, PyTorch's windows).
"""

from __future__ import annotations

import numpy as np
import onnx

from hatcli.deploy.accumulator_lowering import Builder, exact_accumulator
from hatcli.deploy.graph_edit import (
    dequantized_input,
    drop_unused_dequantize,
    index_graph,
    replace_nodes,
    requantize_chain,
    scalar_initializer,
    static_shapes,
)
from hatcli.quant.pool_windows import avg_pool_divisors, output_size, pool_multipliers

_UNSIGNED_OR_WIDE = (onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16)
"""Activation grids after `lower_int8_to_uint8`: ConvInteger takes uint8; 16 bits are split in bytes."""


def lower_average_pool(model: onnx.ModelProto, shapes: dict | None = None) -> tuple[onnx.ModelProto, int]:
    """Replace every 8-bit DequantizeLinear -> AveragePool (2-D, static C, H, W) ->
    QuantizeLinear by ConvInteger(ones) -> Cast -> Mul(multipliers) -> QuantizeLinear(1, z_y).
    Runs after `lower_int8_to_uint8` (ConvInteger takes uint8 activations). Returns the model
    (modified in place) and the number of rewritten pools."""
    graph = model.graph
    initializers, producers, users, outputs = index_graph(graph)
    pools = [n for n in graph.node if n.op_type == "AveragePool"]
    if not pools:
        return model, 0
    shapes = static_shapes(model) if shapes is None else shapes
    rewritten = 0
    for pool in pools:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pool.attribute}
        source = dequantized_input(pool.input[0], producers, initializers)
        found = requantize_chain(pool, users, outputs)
        shape = shapes.get(pool.input[0], [])
        if source is None or found is None or len(found[0]) != 1 or len(shape) != 4 or None in shape[1:]:
            continue
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or any(d != 1 for d in attrs.get("dilations", [1, 1])):
            continue
        x_zero = initializers.get(producers[pool.input[0]].input[2])
        out_scale = scalar_initializer(initializers, found[1].input[1])
        if x_zero is None or x_zero.data_type not in _UNSIGNED_OR_WIDE or out_scale is None:
            continue
        quant = found[1]
        channels, size = shape[1], (shape[2], shape[3])
        kernel = tuple(attrs["kernel_shape"])
        stride = tuple(attrs.get("strides", [1, 1]))
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if pads[0] != pads[2] or pads[1] != pads[3]:
            continue  # PyTorch pads symmetrically; anything else did not come from avg_pool2d
        padding, ceil_mode = (pads[0], pads[1]), bool(attrs.get("ceil_mode", 0))
        out = output_size(size, kernel, stride, padding, ceil_mode)
        # ceil_mode's last windows reach past the padding: pad further with zeros (sum unchanged)
        extra = [max(0, (o - 1) * s + k - (n + 2 * p)) for o, s, k, n, p in zip(out, stride, kernel, size, padding)]
        divisors = avg_pool_divisors(size, kernel, stride, padding, ceil_mode, bool(attrs.get("count_include_pad", 0)))
        b = Builder(graph, pool.name or pool.output[0])
        ones = b.const(np.ones((channels, 1, *kernel), np.uint8), "window")
        window = [onnx.helper.make_attribute(name, value) for name, value in (
            ("group", channels), ("kernel_shape", list(kernel)), ("strides", list(stride)),
            ("pads", [padding[0], padding[1], padding[0] + extra[0], padding[1] + extra[1]]))]
        total = exact_accumulator(b, "Conv", source, x_zero, producers[pool.input[0]].input[2], ones,
                                  b.const(np.uint8(0), "window_zero"), window)
        multipliers = b.const(pool_multipliers(float(source[1]), float(out_scale.reshape(())), divisors)
                              .reshape(1, 1, *out), "multiplier")
        scaled = b.op("Mul", [b.op("Cast", [total], "sum_float", to=onnx.TensorProto.FLOAT), multipliers], "scaled")
        b.nodes.append(onnx.helper.make_node("QuantizeLinear", [scaled, b.const(np.float32(1.0), "unit_scale"),
                                                                quant.input[2]], [quant.output[0]],
                                             name=f"{b.stem}_requantize"))
        nodes = b.nodes
        replace_nodes(graph, [pool, quant], nodes, quant)
        rewritten += 1
    if rewritten:
        drop_unused_dequantize(graph)
    return model, rewritten

