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

from hatcli.deploy.graph_edit import (
    EIGHT_BIT,
    MS_DOMAIN,
    add_constant,
    constant_value,
    dequantized_input,
    drop_unused_dequantize,
    grid_clamp,
    index_graph,
    replace_nodes,
    requantize_chain,
    scalar_initializer,
    static_shapes,
    use_ms_domain,
)
from hatcli.quant.resize_weights import linear_weights

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
    shifted_codes: set[str] = set()

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
        if node.op_type == "QuantizeLinear":
            shifted_codes.add(node.output[0])
    for node in graph.node:  # a clamp of the codes of a narrow (low-bit) grid moves with them
        if node.op_type == "Clip" and node.input and node.input[0] in shifted_codes:
            for position in range(1, len(node.input)):
                bound = initializers.get(node.input[position])
                if bound is not None and bound.data_type == onnx.TensorProto.INT8:
                    node.input[position] = uint8_copy(node.input[position])
    if rewritten:
        del graph.value_info[:]  # stale int8 type annotations; ONNX Runtime re-infers them
        used = {name for node in graph.node for name in node.input} | {i.name for i in graph.input}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return model, rewritten


def _spatial_mean(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    """Whether `node` averages over H and W of an NCHW tensor (keeping the dimensions or not)."""
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if "axes" in attrs:
        axes = list(attrs["axes"])
    elif len(node.input) > 1 and node.input[1] in initializers:
        axes = numpy_helper.to_array(initializers[node.input[1]]).reshape(-1).tolist()
    else:
        return False
    return sorted(a % 4 for a in axes) == [2, 3]


def _exact_mean(graph: onnx.GraphProto, stem: str, dq: onnx.NodeProto, q: onnx.NodeProto, keepdims: int,
                initializers: dict, shape: list) -> list[onnx.NodeProto] | None:
    """A spatial mean of 16-bit integers (no integer kernel takes them): the exact sum in double,
    one cast to float32, times `int_global_avg_pool`'s float32 ``s_x / (s_y N)``, a
    QuantizeLinear of scale 1. None where a scale or the map size is not a constant."""
    x_scale, y_scale = scalar_initializer(initializers, dq.input[1]), scalar_initializer(initializers, q.input[1])
    x_zero = scalar_initializer(initializers, dq.input[2])
    if x_scale is None or y_scale is None or x_zero is None or len(shape) != 4 or None in shape[2:]:
        return None
    multiplier = np.float32(x_scale.reshape(())) / (np.float32(y_scale.reshape(())) * np.float32(shape[2] * shape[3]))
    make = onnx.helper.make_node
    zero = add_constant(graph, np.float64(x_zero.reshape(())), f"{stem}_zero")
    axes = add_constant(graph, np.array([2, 3], np.int64), f"{stem}_sum_axes")
    factor = add_constant(graph, np.float32(multiplier), f"{stem}_multiplier")
    unit = add_constant(graph, np.float32(1.0), f"{stem}_unit_scale")
    return [make("Cast", [dq.input[0]], [f"{stem}_double"], to=onnx.TensorProto.DOUBLE, name=f"{stem}_double"),
            make("Sub", [f"{stem}_double", zero], [f"{stem}_centred"], name=f"{stem}_centred"),
            make("ReduceSum", [f"{stem}_centred", axes], [f"{stem}_sum"], keepdims=keepdims, name=f"{stem}_sum"),
            make("Cast", [f"{stem}_sum"], [f"{stem}_sum_float"], to=onnx.TensorProto.FLOAT, name=f"{stem}_sum_float"),
            make("Mul", [f"{stem}_sum_float", factor], [f"{stem}_scaled"], name=f"{stem}_scaled"),
            make("QuantizeLinear", [f"{stem}_scaled", unit, q.input[2]], [q.output[0]], name=f"{stem}_requantize")]


def fuse_global_average_pool(model: onnx.ModelProto, shapes: dict | None = None) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear -> spatial mean -> QuantizeLinear by one integer
    QLinearGlobalAveragePool (ONNX Runtime's contrib op: exact integer sum, one requantization).

    ONNX Runtime does not fuse this pattern itself, and its float mean sums in an order no other
    implementation reproduces: averages that land on a rounding tie (frequent on a 2x2 map) would
    round either way. The integer op computes what the integer program computes. Returns the
    model (modified in place) and the number of fused patterns.
    """
    graph = model.graph
    initializers, producers, users, outputs = index_graph(graph)
    if shapes is None:
        shapes = static_shapes(model) if any(_spatial_mean(n, initializers) for n in graph.node) else {}
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
        stem = mean.name or mean.output[0]
        keepdims = next((onnx.helper.get_attribute_value(a) for a in mean.attribute if a.name == "keepdims"), 1)
        x_zero, y_zero = initializers.get(dq.input[2]), initializers.get(q.input[2])
        if x_zero is None or y_zero is None:
            continue
        if x_zero.data_type not in EIGHT_BIT or y_zero.data_type not in EIGHT_BIT:
            nodes = _exact_mean(graph, stem, dq, q, keepdims, initializers, shapes.get(mean.input[0], []))
            if nodes is None:
                continue
            replace_nodes(graph, [mean, q], nodes, q)
            fused += 1
            continue
        pooled = q.output[0] if keepdims else f"{stem}_pooled"
        nodes = [onnx.helper.make_node(
            "QLinearGlobalAveragePool", [dq.input[0], dq.input[1], dq.input[2], q.input[1], q.input[2]],
            [pooled], name=f"{stem}_qlinear", domain=MS_DOMAIN, channels_last=0)]
        if not keepdims:
            axes = add_constant(graph, np.array([2, 3], np.int64), f"{stem}_axes")
            nodes.append(onnx.helper.make_node("Squeeze", [pooled, axes], [q.output[0]], name=f"{stem}_squeeze"))
        replace_nodes(graph, [mean, q], nodes, q)
        fused += 1
    if fused:
        drop_unused_dequantize(graph)
        use_ms_domain(model)
    return model, fused


def lower_quantized_binary(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear x2 -> Add | Sub (-> Relu | Clip) | Mul -> QuantizeLinear by explicit
    elementwise ops whose every step rounds once, the same way on every CPU:

    - add / sub: ``Quantize((float(q_a) - z_a) * (s_a / s_c) ± (float(q_b) - z_b) * (s_b / s_c), 1, z_c)``;
    - mul: ``Quantize(float((q_a - z_a) * (q_b - z_b)) * ((s_a s_b) / s_c), 1, z_c)``, the product
      exact in int32.

    ONNX Runtime would fuse these patterns into QLinearAdd / QLinearMul, whose arithmetic depends
    on the CPU (fused multiply-add where it has one, another rounding order where not), so no
    reference could match them everywhere. The integer program computes exactly these sequences
    (`hatcli.quant.integer_kernels.int_add`, `int_mul`). Returns the model (modified in place) and the
    number of rewritten ops.
    """
    graph = model.graph
    initializers, producers, users, outputs = index_graph(graph)
    rewritten = 0
    for op in list(graph.node):
        if op.op_type not in ("Add", "Sub", "Mul") or len(op.input) != 2:
            continue
        a = dequantized_input(op.input[0], producers, initializers)
        b = dequantized_input(op.input[1], producers, initializers)
        found = requantize_chain(op, users, outputs)
        if a is None or b is None or found is None or (op.op_type == "Mul" and len(found[0]) != 1):
            continue
        chain, quant = found
        out_scale = scalar_initializer(initializers, quant.input[1])
        if out_scale is None:
            continue
        out_scale = np.float32(out_scale.reshape(()))
        grid = grid_clamp(chain, quant, initializers, producers)
        if grid is None:
            continue
        stem = op.name or op.output[0]
        make = onnx.helper.make_node
        if op.op_type == "Mul":
            nodes, centred = [], []
            for tag, (tensor, _, zero) in (("a", a), ("b", b)):
                zero_name = add_constant(graph, np.int32(zero), f"{stem}_{tag}_zero")
                nodes += [make("Cast", [tensor], [f"{stem}_{tag}_int"], to=onnx.TensorProto.INT32, name=f"{stem}_{tag}_int"),
                          make("Sub", [f"{stem}_{tag}_int", zero_name], [f"{stem}_{tag}_centred"], name=f"{stem}_{tag}_centred")]
                centred.append(f"{stem}_{tag}_centred")
            multiplier = add_constant(graph, np.float32(np.float32(a[1] * b[1]) / out_scale), f"{stem}_multiplier")
            nodes += [make("Mul", centred, [f"{stem}_product"], name=f"{stem}_product"),
                      make("Cast", [f"{stem}_product"], [f"{stem}_product_float"], to=onnx.TensorProto.FLOAT,
                           name=f"{stem}_product_float"),
                      make("Mul", [f"{stem}_product_float", multiplier], [f"{stem}_scaled"], name=f"{stem}_scaled")]
            total = f"{stem}_scaled"
        else:
            nodes, terms = [], []
            for tag, (tensor, scale, zero) in (("a", a), ("b", b)):
                zero_name = add_constant(graph, np.float32(zero), f"{stem}_{tag}_zero")
                ratio = add_constant(graph, np.float32(scale / out_scale), f"{stem}_{tag}_ratio")
                cast, centred, scaled = f"{stem}_{tag}_float", f"{stem}_{tag}_centred", f"{stem}_{tag}_scaled"
                nodes += [make("Cast", [tensor], [cast], to=onnx.TensorProto.FLOAT, name=cast),
                          make("Sub", [cast, zero_name], [centred], name=centred),
                          make("Mul", [centred, ratio], [scaled], name=scaled)]
                terms.append(scaled)
            total = f"{stem}_sum"
            nodes.append(make(op.op_type, terms, [total], name=total))
            if len(chain) == 2 and chain[1].op_type == "Relu":
                nodes.append(make("Relu", [total], [f"{total}_relu"], name=f"{total}_relu"))
                total = f"{total}_relu"
            elif len(chain) == 2:
                # the clamp's bounds on the output grid, less the zero point: integers, so clamping
                # before the rounding equals clamping after it (`int_add`)
                low, high, y_zero = grid
                nodes.append(make("Clip", [total, add_constant(graph, np.float32(low - y_zero), f"{stem}_clamp_low"),
                                           add_constant(graph, np.float32(high - y_zero), f"{stem}_clamp_high")],
                                  [f"{total}_clamp"], name=f"{total}_clamp"))
                total = f"{total}_clamp"
        one = add_constant(graph, np.float32(1.0), f"{stem}_unit_scale")
        nodes.append(make("QuantizeLinear", [total, one, quant.input[2]], [quant.output[0]], name=f"{stem}_requantize"))
        replace_nodes(graph, [*chain, quant], nodes, quant)
        rewritten += 1
    if rewritten:
        drop_unused_dequantize(graph)
    return model, rewritten


def _resize_axes(op: onnx.NodeProto, attrs: dict, shapes: dict, initializers: dict,
                 producers: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The (rows, cols) weight matrices of a 2-D bilinear Resize of static size
    (`hatcli.quant.resize_weights`); None for any other resize."""
    mode = attrs.get("coordinate_transformation_mode", b"half_pixel")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        return None
    before, after = shapes.get(op.input[0], []), shapes.get(op.output[0], [])
    if len(before) != 4 or len(after) != 4 or None in (*before[2:], *after[2:]):
        return None
    scales = constant_value(op.input[2], initializers, producers) if len(op.input) > 2 and op.input[2] else None
    factors = [None, None] if scales is None or scales.size != 4 else [float(scales[2]), float(scales[3])]
    return tuple(linear_weights(before[axis], after[axis], mode == "align_corners", factors[axis - 2])
                 for axis in (2, 3))


def lower_linear_resize(model: onnx.ModelProto, shapes: dict | None = None) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear -> Resize (linear, 2-D) -> QuantizeLinear with one scale by the
    integer program's fixed-point interpolation (`int_resample`): the integers ``q - z`` in
    float64, ``MatMul(rows, .)``, ``MatMul(., cols^T)`` (exact: dyadic weights), one Cast to
    float32 and a QuantizeLinear of scale 1. Any factor, size and `align_corners` gives the same
    bits on both sides. Returns the model (modified in place) and the number of rewritten resizes."""
    graph = model.graph
    initializers, producers, users, outputs = index_graph(graph)
    resizes = [op for op in graph.node if op.op_type == "Resize"]
    if shapes is None:
        shapes = static_shapes(model) if resizes else {}
    rewritten = 0
    for op in resizes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
        if attrs.get("mode", b"nearest") not in (b"linear", "linear"):
            continue
        source = dequantized_input(op.input[0], producers, initializers)
        found = requantize_chain(op, users, outputs)
        if source is None or found is None or len(found[0]) != 1:
            continue
        quant = found[1]
        dq = producers[op.input[0]]
        if quant.input[1] != dq.input[1] and scalar_initializer(initializers, quant.input[1]) != source[1]:
            continue
        if quant.input[2] != dq.input[2] and scalar_initializer(initializers, quant.input[2]) != source[2]:
            continue
        axes = _resize_axes(op, attrs, shapes, initializers, producers)
        if axes is None:
            continue
        stem = op.name or op.output[0]
        make = onnx.helper.make_node
        zero = add_constant(graph, np.float64(source[2]), f"{stem}_zero")
        rows = add_constant(graph, axes[0], f"{stem}_rows")
        cols = add_constant(graph, np.ascontiguousarray(axes[1].T), f"{stem}_cols")
        one = add_constant(graph, np.float32(1.0), f"{stem}_unit_scale")
        nodes = [make("Cast", [source[0]], [f"{stem}_double"], to=onnx.TensorProto.DOUBLE, name=f"{stem}_double"),
                 make("Sub", [f"{stem}_double", zero], [f"{stem}_centred"], name=f"{stem}_centred"),
                 make("MatMul", [rows, f"{stem}_centred"], [f"{stem}_rows_mixed"], name=f"{stem}_rows_mixed"),
                 make("MatMul", [f"{stem}_rows_mixed", cols], [f"{stem}_resized"], name=f"{stem}_resized"),
                 make("Cast", [f"{stem}_resized"], [f"{stem}_float"], to=onnx.TensorProto.FLOAT, name=f"{stem}_float"),
                 make("QuantizeLinear", [f"{stem}_float", one, quant.input[2]], [quant.output[0]],
                      name=f"{stem}_requantize")]
        replace_nodes(graph, [op, quant], nodes, quant)
        rewritten += 1
    if rewritten:
        drop_unused_dequantize(graph)
    return model, rewritten
