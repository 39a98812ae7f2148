"""Compile-time lowering of the QDQ graph to the integer formats the runtime computes exactly.

Our quantizer produces symmetric int8 (zero point 0). ONNX Runtime's fused x86 kernels for
uint8 x int8 products (QLinearConv / QGemm "U8S8") sum pairs of products in 16 bits on CPUs
without VNNI and can saturate, so the compiled artifact would not compute what the integer
program computes. Every int8 tensor with zero point z is the same set of real values as a uint8
tensor with zero point z + 128 (q_u8 = q_s8 + 128), so rewriting int8 weights and activations to
uint8 changes no value, and the U8U8 kernels accumulate exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _shifted(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    values = numpy_helper.to_array(tensor).astype(np.int16) + 128
    return numpy_helper.from_array(values.astype(np.uint8), name)


def lower_int8_to_uint8(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite every int8 Q/DQ (and the int8 weights they read) as uint8 with zero point + 128.

    Returns the model (modified in place) and how many Q/DQ nodes were rewritten. Shared
    initializers are copied, never changed in place, so other readers keep their int8 view.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    made: dict[str, str] = {}
    rewritten = 0

    def uint8_copy(name: str) -> str:
        if name not in made:
            new_name = f"{name}__u8"
            graph.initializer.append(_shifted(initializers[name], new_name))
            made[name] = new_name
        return made[name]

    for node in graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 3:
            continue
        zero_point = initializers.get(node.input[2])
        if zero_point is None or zero_point.data_type != onnx.TensorProto.INT8:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            node.input[0] = uint8_copy(node.input[0])
        node.input[2] = uint8_copy(node.input[2])
        rewritten += 1
    if rewritten:
        del graph.value_info[:]  # stale int8 type annotations; ONNX Runtime re-infers them
        used = {name for node in graph.node for name in node.input} | {i.name for i in graph.input}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return model, rewritten
