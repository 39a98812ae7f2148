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


def lower_int8_to_uint8(model: onnx.ModelProto, weights: bool = True) -> tuple[onnx.ModelProto, int]:
    """Rewrite every int8 Q/DQ (and the int8 weights they read) as uint8 with zero point + 128.

    With `weights=False` only activations move to uint8: constant int8 weights keep zero point
    0, so ONNX Runtime runs its symmetric U8S8 kernels (several times faster than U8U8), which
    are exact where the CPU sums u8 x s8 products in 32 bits (VNNI, Arm dot products; see
    `hatcli.deploy.cpu.exact_u8s8`). Returns the model (modified in place) and how many Q/DQ
    nodes were rewritten. Shared initializers are copied, never changed in place, so other
    readers keep their int8 view.
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
            if not weights:
                continue
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
        pool = onnx.helper.make_node(
            "QLinearGlobalAveragePool", [dq.input[0], dq.input[1], dq.input[2], q.input[1], q.input[2]],
            [q.output[0]], name=f"{mean.name or mean.output[0]}_qlinear", domain=MS_DOMAIN, channels_last=0)
        position = list(graph.node).index(q)
        graph.node.insert(position, pool)
        for node in (mean, q):
            graph.node.remove(node)
        fused += 1
    if fused:
        _drop_unused_dequantize(graph)
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


def _requantize_chain(node: onnx.NodeProto, users: dict, outputs: set) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    """(node [+ Relu], the QuantizeLinear that ends the chain) when `node`'s result is requantized."""
    chain = [node]
    nxt = users.get(node.output[0], [])
    if len(nxt) == 1 and nxt[0].op_type == "Relu" and node.output[0] not in outputs:
        chain.append(nxt[0])
        nxt = users.get(nxt[0].output[0], [])
    if len(nxt) != 1 or nxt[0].op_type != "QuantizeLinear" or chain[-1].output[0] in outputs:
        return None
    if len(nxt[0].input) < 3:
        return None
    return chain, nxt[0]


def _replace(graph: onnx.GraphProto, old: list[onnx.NodeProto], new: list[onnx.NodeProto], anchor: onnx.NodeProto) -> None:
    position = list(graph.node).index(anchor)
    for offset, node in enumerate(new):
        graph.node.insert(position + offset, node)
    for node in old:
        graph.node.remove(node)


def _const(graph: onnx.GraphProto, value: np.ndarray, name: str) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def lower_quantized_binary(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear x2 -> Add | Sub (-> Relu) | Mul -> QuantizeLinear by explicit
    elementwise ops whose every step rounds once, the same way on every CPU:

    - add / sub: ``Quantize((float(q_a) - z_a) * (s_a / s_c) ± (float(q_b) - z_b) * (s_b / s_c), 1, z_c)``;
    - mul: ``Quantize(float((q_a - z_a) * (q_b - z_b)) * ((s_a s_b) / s_c), 1, z_c)``, the product
      exact in int32.

    ONNX Runtime would fuse these patterns into QLinearAdd / QLinearMul, whose arithmetic depends
    on the CPU (fused multiply-add where it has one, another rounding order where not), so no
    reference could match them everywhere. The integer program computes exactly these sequences
    (`hatcli.quant.integer.int_add`, `int_mul`). Returns the model (modified in place) and the
    number of rewritten ops.
    """
    graph = model.graph
    initializers, producers, users, outputs = _index(graph)
    rewritten = 0
    for op in list(graph.node):
        if op.op_type not in ("Add", "Sub", "Mul") or len(op.input) != 2:
            continue
        a = _dequantized_input(op.input[0], producers, initializers)
        b = _dequantized_input(op.input[1], producers, initializers)
        found = _requantize_chain(op, users, outputs)
        if a is None or b is None or found is None or (op.op_type == "Mul" and len(found[0]) != 1):
            continue
        chain, quant = found
        out_scale = _scalar(initializers, quant.input[1])
        if out_scale is None:
            continue
        out_scale = np.float32(out_scale.reshape(()))
        stem = op.name or op.output[0]
        make = onnx.helper.make_node
        if op.op_type == "Mul":
            nodes, centred = [], []
            for tag, (tensor, _, zero) in (("a", a), ("b", b)):
                zero_name = _const(graph, np.int32(zero), f"{stem}_{tag}_zero")
                nodes += [make("Cast", [tensor], [f"{stem}_{tag}_int"], to=onnx.TensorProto.INT32, name=f"{stem}_{tag}_int"),
                          make("Sub", [f"{stem}_{tag}_int", zero_name], [f"{stem}_{tag}_centred"], name=f"{stem}_{tag}_centred")]
                centred.append(f"{stem}_{tag}_centred")
            multiplier = _const(graph, np.float32(np.float32(a[1] * b[1]) / out_scale), f"{stem}_multiplier")
            nodes += [make("Mul", centred, [f"{stem}_product"], name=f"{stem}_product"),
                      make("Cast", [f"{stem}_product"], [f"{stem}_product_float"], to=onnx.TensorProto.FLOAT,
                           name=f"{stem}_product_float"),
                      make("Mul", [f"{stem}_product_float", multiplier], [f"{stem}_scaled"], name=f"{stem}_scaled")]
            total = f"{stem}_scaled"
        else:
            nodes, terms = [], []
            for tag, (tensor, scale, zero) in (("a", a), ("b", b)):
                zero_name = _const(graph, np.float32(zero), f"{stem}_{tag}_zero")
                ratio = _const(graph, np.float32(scale / out_scale), f"{stem}_{tag}_ratio")
                cast, centred, scaled = f"{stem}_{tag}_float", f"{stem}_{tag}_centred", f"{stem}_{tag}_scaled"
                nodes += [make("Cast", [tensor], [cast], to=onnx.TensorProto.FLOAT, name=cast),
                          make("Sub", [cast, zero_name], [centred], name=centred),
                          make("Mul", [centred, ratio], [scaled], name=scaled)]
                terms.append(scaled)
            total = f"{stem}_sum"
            nodes.append(make(op.op_type, terms, [total], name=total))
            if len(chain) == 2:
                nodes.append(make("Relu", [total], [f"{total}_relu"], name=f"{total}_relu"))
                total = f"{total}_relu"
        one = _const(graph, np.float32(1.0), f"{stem}_unit_scale")
        nodes.append(make("QuantizeLinear", [total, one, quant.input[2]], [quant.output[0]], name=f"{stem}_requantize"))
        _replace(graph, [*chain, quant], nodes, quant)
        rewritten += 1
    if rewritten:
        _drop_unused_dequantize(graph)
    return model, rewritten


def lower_linear_resize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear -> Resize (linear) -> QuantizeLinear with one scale by a Resize of
    the integers ``q - z`` (as float32) and a QuantizeLinear of scale 1: for a factor of 2 every
    weight is a multiple of 1/4 and every sum exact, so the result does not depend on how the
    runtime orders its arithmetic, and equals the integer program's (`int_resample`). Returns the
    model (modified in place) and the number of rewritten resizes."""
    graph = model.graph
    initializers, producers, users, outputs = _index(graph)
    rewritten = 0
    for op in list(graph.node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
        if op.op_type != "Resize" or attrs.get("mode", b"nearest") not in (b"linear", "linear"):
            continue
        source = _dequantized_input(op.input[0], producers, initializers)
        found = _requantize_chain(op, users, outputs)
        if source is None or found is None or len(found[0]) != 1:
            continue
        quant = found[1]
        dq = producers[op.input[0]]
        if quant.input[1] != dq.input[1] and _scalar(initializers, quant.input[1]) != source[1]:
            continue
        if quant.input[2] != dq.input[2] and _scalar(initializers, quant.input[2]) != source[2]:
            continue
        stem = op.name or op.output[0]
        make = onnx.helper.make_node
        zero = _const(graph, np.float32(source[2]), f"{stem}_zero")
        one = _const(graph, np.float32(1.0), f"{stem}_unit_scale")
        resize = onnx.helper.make_node("Resize", [f"{stem}_centred", *op.input[1:]], [f"{stem}_resized"],
                                       name=f"{stem}_integer")
        resize.attribute.extend(op.attribute)
        nodes = [make("Cast", [source[0]], [f"{stem}_float"], to=onnx.TensorProto.FLOAT, name=f"{stem}_float"),
                 make("Sub", [f"{stem}_float", zero], [f"{stem}_centred"], name=f"{stem}_centred"),
                 resize,
                 make("QuantizeLinear", [f"{stem}_resized", one, quant.input[2]], [quant.output[0]],
                      name=f"{stem}_requantize")]
        _replace(graph, [op, quant], nodes, quant)
        rewritten += 1
    if rewritten:
        _drop_unused_dequantize(graph)
    return model, rewritten


def _constant_value(name: str, initializers: dict, producers: dict) -> np.ndarray | None:
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
    return None


def _table_function(op: onnx.NodeProto, dq_output: str, initializers: dict, producers: dict):
    """The torch function an elementwise ONNX op computes, or None when it is not a table op."""
    import torch

    aten = torch.ops.aten
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
    simple = {"Sigmoid": aten.sigmoid.default, "Tanh": aten.tanh.default, "HardSwish": aten.hardswish.default,
              "Exp": aten.exp.default}
    if op.op_type in simple and len(op.input) == 1:
        return simple[op.op_type]
    if op.op_type == "HardSigmoid":
        alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
        if abs(alpha - 1 / 6) < 1e-6 and beta == 0.5:
            return aten.hardsigmoid.default  # what torch's hardsigmoid exports to: same formula, same bits
        return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)
    if op.op_type in ("Mul", "Div") and len(op.input) == 2:
        other = op.input[1] if op.input[0] == dq_output else op.input[0]
        if op.op_type == "Div" and op.input[0] != dq_output:
            return None
        value = _constant_value(other, initializers, producers)
        if value is None or value.size != 1:
            return None
        constant = torch.tensor(value.reshape(()).astype(np.float32))
        target = aten.mul.Tensor if op.op_type == "Mul" else aten.div.Tensor
        return lambda x: target(x, constant)
    return None


RUNTIME_TABLE_OPS = {"Sigmoid": "QLinearSigmoid"}
"""Elementwise ops that ONNX Runtime fuses, between DequantizeLinear and QuantizeLinear, into a
kernel computing a 256-entry table of its own (much faster than our Cast + Gather)."""


def runtime_table_matches(op_type: str, in_zero: onnx.TensorProto, in_scale: float, out_zero: onnx.TensorProto,
                          out_scale: float, table: np.ndarray) -> bool:
    """Whether ONNX Runtime, given DequantizeLinear -> `op_type` -> QuantizeLinear with these
    quantization parameters, fuses them into its table kernel and that kernel returns exactly
    `table` for every one of the 256 codes (which proves it equal for any input: the op is
    elementwise and the fused kernel is a lookup)."""
    import tempfile
    from pathlib import Path

    from hatcli.deploy.runtime import create_session

    helper = onnx.helper
    codes = np.arange(256, dtype=np.int16) + (-128 if in_zero.data_type == onnx.TensorProto.INT8 else 0)
    in_type = helper.tensor_dtype_to_np_dtype(in_zero.data_type)
    inits = [numpy_helper.from_array(np.float32(in_scale), "s"), numpy_helper.from_array(numpy_helper.to_array(in_zero).reshape(()), "z"),
             numpy_helper.from_array(np.float32(out_scale), "ys"), numpy_helper.from_array(numpy_helper.to_array(out_zero).reshape(()), "yz")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]), helper.make_node(op_type, ["d"], ["f"]),
             helper.make_node("QuantizeLinear", ["f", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "table_check", [helper.make_tensor_value_info("x", in_zero.data_type, [256])],
                              [helper.make_tensor_value_info("y", out_zero.data_type, [256])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session = create_session(model.SerializeToString(), "ORT_ENABLE_EXTENDED", threads=1, optimized_path=optimized)
        fused = [n.op_type for n in onnx.load(str(optimized)).graph.node] == [RUNTIME_TABLE_OPS[op_type]]
    if not fused:
        return False
    out = session.run(None, {"x": codes.astype(in_type)})[0]
    return bool(np.array_equal(out, table))


def lower_lookup_tables(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear -> elementwise function -> QuantizeLinear on an 8-bit tensor by a
    256-entry table (Cast + Gather), as an accelerator computes sigmoid, tanh, hardswish, exp, ...
    A pattern that ONNX Runtime fuses into a table kernel of its own (`RUNTIME_TABLE_OPS`) is left
    as it is when that kernel is checked to hold the same 256 entries (`runtime_table_matches`).

    The table is built by `hatcli.quant.integer.lookup_table`, the function the integer program
    builds its own tables with, so the artifact and `int_infer` hold the same entries (ONNX
    Runtime's fused QLinearSigmoid would use its own approximation of the function instead).
    Returns the model (modified in place) and the number of tables.
    """
    import torch

    from hatcli.quant.integer import lookup_table

    graph = model.graph
    initializers, producers, users, outputs = _index(graph)
    eight_bit = {onnx.TensorProto.UINT8: (torch.uint8, np.iinfo(np.uint8)),
                 onnx.TensorProto.INT8: (torch.int8, np.iinfo(np.int8))}
    tables = 0
    for op in list(graph.node):
        if not op.input:
            continue
        dq_name = next((name for name in op.input if _dequantized_input(name, producers, initializers)), None)
        if dq_name is None:
            continue
        tensor, scale, zero = _dequantized_input(dq_name, producers, initializers)
        fn = _table_function(op, dq_name, initializers, producers)
        found = _requantize_chain(op, users, outputs)
        if fn is None or found is None or len(found[0]) != 1:
            continue
        quant = found[1]
        in_zero = initializers.get(producers[dq_name].input[2])
        out_scale, out_zero = _scalar(initializers, quant.input[1]), initializers.get(quant.input[2])
        if in_zero is None or out_zero is None or out_scale is None:
            continue
        if in_zero.data_type not in eight_bit or out_zero.data_type not in eight_bit:
            continue
        in_info = eight_bit[in_zero.data_type][1]
        out_dtype, out_info = eight_bit[out_zero.data_type]
        table = lookup_table(fn, float(scale), zero, int(in_info.min), int(in_info.max), float(out_scale.reshape(())),
                             int(numpy_helper.to_array(out_zero).reshape(())), int(out_info.min), int(out_info.max),
                             out_dtype).numpy()
        if op.op_type in RUNTIME_TABLE_OPS and runtime_table_matches(
                op.op_type, in_zero, float(scale), out_zero, float(out_scale.reshape(())), table):
            continue  # ONNX Runtime's own table kernel holds the same entries: leave the pattern to it
        stem = op.name or op.output[0]
        make = onnx.helper.make_node
        table_name = _const(graph, table, f"{stem}_table")
        nodes = [make("Cast", [tensor], [f"{stem}_index"], to=onnx.TensorProto.INT32, name=f"{stem}_index")]
        index = f"{stem}_index"
        if in_info.min != 0:
            offset = _const(graph, np.int32(-in_info.min), f"{stem}_offset")
            nodes.append(make("Add", [index, offset], [f"{stem}_position"], name=f"{stem}_position"))
            index = f"{stem}_position"
        nodes.append(make("Gather", [table_name, index], [quant.output[0]], axis=0, name=f"{stem}_lookup"))
        _replace(graph, [op, quant], nodes, quant)
        tables += 1
    if tables:
        _drop_unused_dequantize(graph)
    return model, tables


def _constant_dequantize(name: str, producers: dict, initializers: dict) -> tuple[np.ndarray, np.ndarray, onnx.TensorProto] | None:
    """(quantized values, scale, zero-point tensor) of a DequantizeLinear of initializers."""
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
        return None
    if not all(i in initializers for i in dq.input[:3]):
        return None
    return (numpy_helper.to_array(initializers[dq.input[0]]), numpy_helper.to_array(initializers[dq.input[1]]),
            initializers[dq.input[2]])


def lower_output_conv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear -> Conv (8-bit weights, int32 bias) whose result is a graph output by
    ``Mul(Cast(ConvInteger(q_x, q_w) + q_bias, float), s_x * s_w)`` (the sum in int64): the
    dequantized accumulator.

    ONNX Runtime runs that pattern as a float Conv of the dequantized values, whose sums round in
    an order of its own (one unit in the last place off the exact result). The integer program
    computes the exact accumulator, rounds it to float32 once and multiplies by the float32
    per-channel ``s_x * s_w`` (`hatcli.quant.integer.int_weighted`); so do these ops, bit for bit.
    Runs after `lower_int8_to_uint8`; int8 weights it left in place are shifted to uint8 here
    (ConvInteger's exact U8U8 kernel). Returns the model
    (modified in place) and the number of rewritten convs.
    """
    graph = model.graph
    initializers, producers, _, outputs = _index(graph)
    eight_bit = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
    rewritten = 0
    for conv in list(graph.node):
        if conv.op_type != "Conv" or conv.output[0] not in outputs or len(conv.input) < 2:
            continue
        source = _dequantized_input(conv.input[0], producers, initializers)
        weight = _constant_dequantize(conv.input[1], producers, initializers)
        bias = _constant_dequantize(conv.input[2], producers, initializers) if len(conv.input) > 2 and conv.input[2] else None
        if source is None or weight is None or (len(conv.input) > 2 and conv.input[2] and bias is None):
            continue
        x_zero = initializers.get(producers[conv.input[0]].input[2])
        q_w, w_scale, w_zero = weight
        w_zeros = numpy_helper.to_array(w_zero).reshape(-1)
        if x_zero is None or x_zero.data_type not in eight_bit or w_zero.data_type not in eight_bit:
            continue
        if w_zeros.size == 0 or not np.all(w_zeros == w_zeros[0]):
            continue  # ConvInteger takes one weight zero point
        if bias is not None and (bias[2].data_type != onnx.TensorProto.INT32 or np.any(numpy_helper.to_array(bias[2]))):
            continue
        channels = q_w.shape[0]
        stem = conv.name or conv.output[0]
        make = onnx.helper.make_node
        weight_name = producers[conv.input[1]].input[0]
        if w_zero.data_type == onnx.TensorProto.INT8:
            # ConvInteger's U8U8 kernel is exact and several times faster than its U8S8 one
            weight_name = _const(graph, (q_w.astype(np.int16) + 128).astype(np.uint8), f"{stem}_weight_u8")
            w_zeros = (w_zeros.astype(np.int16) + 128).astype(np.uint8)
        w_zero_name = _const(graph, w_zeros[:1].reshape(()), f"{stem}_w_zero")
        integer = make("ConvInteger", [source[0], weight_name, producers[conv.input[0]].input[2],
                                       w_zero_name], [f"{stem}_acc"], name=f"{stem}_integer")
        integer.attribute.extend(conv.attribute)
        nodes, acc = [integer], f"{stem}_acc"
        if bias is not None:
            # in int64: accumulator + a (saturated) int32 bias can leave int32, the integer program's sum does not wrap
            q_bias = _const(graph, bias[0].astype(np.int64).reshape(1, channels, 1, 1), f"{stem}_bias")
            nodes += [make("Cast", [acc], [f"{stem}_acc64"], to=onnx.TensorProto.INT64, name=f"{stem}_acc64"),
                      make("Add", [f"{stem}_acc64", q_bias], [f"{stem}_biased"], name=f"{stem}_biased")]
            acc = f"{stem}_biased"
        multiplier = (np.float32(source[1]) * w_scale.astype(np.float32).reshape(-1)).astype(np.float32)
        multiplier_name = _const(graph, multiplier.reshape(1, channels, 1, 1), f"{stem}_multiplier")
        nodes += [make("Cast", [acc], [f"{stem}_acc_float"], to=onnx.TensorProto.FLOAT, name=f"{stem}_acc_float"),
                  make("Mul", [f"{stem}_acc_float", multiplier_name], [conv.output[0]], name=f"{stem}_dequantize")]
        _replace(graph, [conv], nodes, conv)
        rewritten += 1
    if rewritten:
        _drop_unused_dequantize(graph)
    return model, rewritten


def _drop_unused_dequantize(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]:
        graph.node.remove(node)
