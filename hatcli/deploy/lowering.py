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


MS_DOMAIN = "com.microsoft"


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _index(graph: onnx.GraphProto) -> tuple[dict, dict, dict, set]:
    """(initializers by name, producer of each tensor, consumers of each tensor, graph outputs)."""
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    return initializers, producers, _consumers(graph), {o.name for o in graph.output}


def _spatial_mean(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    """Whether `node` averages over H and W of an NCHW tensor, keeping the dimensions."""
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("keepdims", 1) != 1:
        return False
    if "axes" in attrs:
        axes = list(attrs["axes"])
    elif len(node.input) > 1 and node.input[1] in initializers:
        axes = numpy_helper.to_array(initializers[node.input[1]]).reshape(-1).tolist()
    else:
        return False
    return sorted(a % 4 for a in axes) == [2, 3]


def fuse_global_average_pool(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear -> spatial mean -> QuantizeLinear by one integer
    QLinearGlobalAveragePool (ONNX Runtime's contrib op: exact integer sum, one requantization).

    ONNX Runtime does not fuse this pattern itself, and its float mean sums in an order no other
    implementation reproduces: averages that land on a rounding tie (frequent on a 2x2 map) would
    round either way. The integer op computes what the integer program computes. Returns the
    model (modified in place) and the number of fused patterns.
    """
    graph = model.graph
    initializers, producers, users, outputs = _index(graph)
    fused = 0
    for mean in list(graph.node):
        if not _spatial_mean(mean, initializers):
            continue
        dq = producers.get(mean.input[0])
        mean_users = users.get(mean.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(mean_users) != 1:
            continue
        q = mean_users[0]
        if q.op_type != "QuantizeLinear" or mean.output[0] in outputs or len(q.input) < 3 or len(dq.input) < 3:
            continue
        if len(users.get(dq.output[0], [])) != 1 or dq.output[0] in outputs:
            continue
        pool = onnx.helper.make_node(
            "QLinearGlobalAveragePool", [dq.input[0], dq.input[1], dq.input[2], q.input[1], q.input[2]],
            [q.output[0]], name=f"{mean.name or mean.output[0]}_qlinear", domain=MS_DOMAIN, channels_last=0)
        position = list(graph.node).index(q)
        graph.node.insert(position, pool)
        for node in (dq, mean, q):
            graph.node.remove(node)
        fused += 1
    if fused and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return model, fused


def _scalar(initializers: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    tensor = initializers.get(name)
    if tensor is None:
        return None
    value = numpy_helper.to_array(tensor)
    return value if value.size == 1 else None


def _dequantized_input(name: str, producers: dict[str, onnx.NodeProto],
                       initializers: dict[str, onnx.TensorProto]) -> tuple[str, np.float32, int] | None:
    """(quantized tensor, scale, zero point) behind a per-tensor DequantizeLinear output."""
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
        return None
    scale, zero = _scalar(initializers, dq.input[1]), _scalar(initializers, dq.input[2])
    if scale is None or zero is None:
        return None
    return dq.input[0], np.float32(scale.reshape(())), int(zero.reshape(()))


def lower_quantized_add(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear x2 -> Add (-> Relu) -> QuantizeLinear by explicit elementwise ops
    whose every step is one IEEE float32 operation:
    ``q_c = Quantize(((float(q_a) - z_a) * (s_a / s_c) + (float(q_b) - z_b) * (s_b / s_c)), 1, z_c)``.

    ONNX Runtime would fuse the pattern into QLinearAdd, whose arithmetic depends on the CPU
    (fused multiply-add where the CPU has it, a different rounding order where it has not), so no
    reference could match it everywhere. These ops round the same way on every CPU, and the
    integer program computes exactly the same sequence (`hatcli.quant.integer.int_add`).
    Returns the model (modified in place) and the number of rewritten adds.
    """
    graph = model.graph
    initializers, producers, users, outputs = _index(graph)
    rewritten = 0
    for add in list(graph.node):
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        a = _dequantized_input(add.input[0], producers, initializers)
        b = _dequantized_input(add.input[1], producers, initializers)
        chain = [add]
        nxt = users.get(add.output[0], [])
        if len(nxt) == 1 and nxt[0].op_type == "Relu" and add.output[0] not in outputs:
            chain.append(nxt[0])
            nxt = users.get(nxt[0].output[0], [])
        if a is None or b is None or len(nxt) != 1 or nxt[0].op_type != "QuantizeLinear":
            continue
        quant = nxt[0]
        if chain[-1].output[0] in outputs or len(quant.input) < 3:
            continue
        out_scale = _scalar(initializers, quant.input[1])
        if out_scale is None:
            continue
        stem = add.name or add.output[0]
        new_nodes: list[onnx.NodeProto] = []
        terms = []
        for tag, (tensor, scale, zero) in (("a", a), ("b", b)):
            ratio = np.float32(scale / np.float32(out_scale.reshape(())))
            for suffix, value in ((f"{tag}_zero", np.float32(zero)), (f"{tag}_ratio", ratio)):
                graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), f"{stem}_{suffix}"))
            cast, centred, scaled = f"{stem}_{tag}_float", f"{stem}_{tag}_centred", f"{stem}_{tag}_scaled"
            new_nodes += [
                onnx.helper.make_node("Cast", [tensor], [cast], to=onnx.TensorProto.FLOAT, name=cast),
                onnx.helper.make_node("Sub", [cast, f"{stem}_{tag}_zero"], [centred], name=centred),
                onnx.helper.make_node("Mul", [centred, f"{stem}_{tag}_ratio"], [scaled], name=scaled),
            ]
            terms.append(scaled)
        total = f"{stem}_sum"
        new_nodes.append(onnx.helper.make_node("Add", terms, [total], name=total))
        if len(chain) == 2:
            new_nodes.append(onnx.helper.make_node("Relu", [total], [f"{total}_relu"], name=f"{total}_relu"))
            total = f"{total}_relu"
        one = f"{stem}_unit_scale"
        graph.initializer.append(numpy_helper.from_array(np.asarray(1.0, np.float32), one))
        new_nodes.append(onnx.helper.make_node("QuantizeLinear", [total, one, quant.input[2]], [quant.output[0]],
                                               name=f"{stem}_requantize"))
        position = list(graph.node).index(quant)
        for offset, node in enumerate(new_nodes):
            graph.node.insert(position + offset, node)
        for node in (*chain, quant):
            graph.node.remove(node)
        rewritten += 1
    if rewritten:
        _drop_unused_dequantize(graph)
    return model, rewritten


def _drop_unused_dequantize(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]:
        graph.node.remove(node)
