"""Compile-time lowering of quantized elementwise functions (sigmoid, tanh, hardswish, GELU, exp, sign, a
constant scale, a clamp standing alone) to 256-entry tables, as an accelerator computes them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from hatcli.deploy.graph_edit import (
    add_constant,
    constant_value,
    dequantized_input,
    drop_unused_dequantize,
    index_graph,
    quantized_range,
    onnx_clamp_bounds,
    replace_nodes,
    requantize_chain,
    scalar_initializer,
)
from hatcli.quant.clamps import ONNX_CLAMPS


def _table_function(op: onnx.NodeProto, dq_output: str, initializers: dict, producers: dict):
    """The torch function an elementwise ONNX op computes, or None when it is not a table op."""
    import torch

    aten = torch.ops.aten
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
    simple = {"Sigmoid": aten.sigmoid.default, "Tanh": aten.tanh.default, "HardSwish": aten.hardswish.default,
              "Exp": aten.exp.default, "Sign": aten.sign.default}
    if op.op_type in simple and len(op.input) == 1:
        return simple[op.op_type]
    if op.op_type == "Gelu" and len(op.input) == 1:
        approximate = attrs.get("approximate", "none")
        approximate = approximate.decode() if isinstance(approximate, bytes) else str(approximate)
        return lambda x: aten.gelu.default(x, approximate=approximate)  # what torch's gelu exports to
    if op.op_type in ONNX_CLAMPS:  # a clamp standing alone (a fused one follows a conv, not a dequantize)
        bounds = onnx_clamp_bounds(op, initializers, producers)
        if bounds is None:
            return None
        low, high = bounds.low, bounds.high
        return lambda x: torch.clamp(x, low, high)
    if op.op_type == "HardSigmoid":
        alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
        if abs(alpha - 1 / 6) < 1e-6 and beta == 0.5:
            return aten.hardsigmoid.default  # what torch's hardsigmoid exports to: same formula, same bits
        return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)
    if op.op_type in ("Mul", "Div") and len(op.input) == 2:
        other = op.input[1] if op.input[0] == dq_output else op.input[0]
        if op.op_type == "Div" and op.input[0] != dq_output:
            return None
        value = constant_value(other, initializers, producers)
        if value is None or value.size != 1:
            return None
        constant = torch.tensor(value.reshape(()).astype(np.float32))
        target = aten.mul.Tensor if op.op_type == "Mul" else aten.div.Tensor
        return lambda x: target(x, constant)
    return None


def _gather(graph: onnx.GraphProto, stem: str, tensor: str, qmin: int, table: np.ndarray,
            output: str) -> list[onnx.NodeProto]:
    """The nodes that look `tensor` (integers from `qmin`) up in `table`, writing `output`."""
    make = onnx.helper.make_node
    table_name = add_constant(graph, table, f"{stem}_table")
    nodes = [make("Cast", [tensor], [f"{stem}_index"], to=onnx.TensorProto.INT32, name=f"{stem}_index")]
    index = f"{stem}_index"
    if qmin != 0:
        offset = add_constant(graph, np.int32(-qmin), f"{stem}_offset")
        nodes.append(make("Add", [index, offset], [f"{stem}_position"], name=f"{stem}_position"))
        index = f"{stem}_position"
    nodes.append(make("Gather", [table_name, index], [output], axis=0, name=f"{stem}_lookup"))
    return nodes


def _table(fn, source: tuple[str, np.float32, int], in_zero: onnx.TensorProto | None, quant: onnx.NodeProto,
           initializers: dict) -> np.ndarray | None:
    """The table (`lookup_table`) of `fn` from the grid of `source` (its zero-point tensor
    `in_zero`) onto the grid `quant` writes; None where a grid is not an 8- or 16-bit constant one."""
    import torch

    from hatcli.quant.integer_kernels import lookup_table

    out_scale, out_zero = scalar_initializer(initializers, quant.input[1]), initializers.get(quant.input[2])
    in_range = None if in_zero is None else quantized_range(in_zero)
    out_range = None if out_zero is None else quantized_range(out_zero)
    if in_range is None or out_range is None or out_scale is None:
        return None
    out_dtype = getattr(torch, onnx.helper.tensor_dtype_to_np_dtype(out_zero.data_type).name)
    return lookup_table(fn, float(source[1]), source[2], *in_range, float(out_scale.reshape(())),
                        int(numpy_helper.to_array(out_zero).reshape(())), *out_range, out_dtype).numpy()


def lower_requantize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear -> QuantizeLinear onto another grid (a concatenation's input, an
    int16 layer's) by a table of the identity (`lookup_table`), as the integer program computes
    it: a float requantization rounds ties by the runtime's own arithmetic. Returns the model
    (modified in place) and the number of tables."""
    graph = model.graph
    initializers, producers, _, _ = index_graph(graph)
    tables = 0
    for quant in list(graph.node):
        if quant.op_type != "QuantizeLinear" or len(quant.input) < 3:
            continue
        source = dequantized_input(quant.input[0], producers, initializers)
        in_zero = None if source is None else initializers.get(producers[quant.input[0]].input[2])
        out_scale, out_zero = scalar_initializer(initializers, quant.input[1]), initializers.get(quant.input[2])
        if in_zero is None or out_zero is None or out_scale is None:
            continue
        if (float(source[1]), source[2], in_zero.data_type) == (
                float(out_scale.reshape(())), int(numpy_helper.to_array(out_zero).reshape(())), out_zero.data_type):
            continue  # the same grid: the pair is the identity
        table = _table(lambda x: x, source, in_zero, quant, initializers)
        if table is None:
            continue
        in_min = quantized_range(in_zero)[0]
        nodes = _gather(graph, quant.name or quant.output[0], source[0], in_min, table, quant.output[0])
        replace_nodes(graph, [quant], nodes, quant)
        tables += 1
    if tables:
        drop_unused_dequantize(graph)
    return model, tables


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


def lower_lookup_tables(model: onnx.ModelProto, runtime_tables: bool = True) -> tuple[onnx.ModelProto, int]:
    """Replace DequantizeLinear -> elementwise function -> QuantizeLinear on an 8- or 16-bit tensor
    by a 256- or 65536-entry table (Cast + Gather), as an accelerator computes sigmoid, tanh, hardswish, exp, ...
    With `runtime_tables` (ONNX Runtime will fuse QDQ patterns: `--opt 2` and `3`), a pattern it
    fuses into a table kernel of its own (`RUNTIME_TABLE_OPS`) is left as it is when that kernel
    is checked to hold the same 256 entries (`runtime_table_matches`).

    The table is built by `hatcli.quant.integer_kernels.lookup_table`, the function the integer
    program builds its own tables with, so the artifact and `int_infer` hold the same entries.
    Returns the model (modified in place) and the number of tables.
    """
    graph = model.graph
    initializers, producers, users, outputs = index_graph(graph)
    tables = 0
    for op in list(graph.node):
        if not op.input:
            continue
        dq_name = next((name for name in op.input if dequantized_input(name, producers, initializers)), None)
        if dq_name is None:
            continue
        source = dequantized_input(dq_name, producers, initializers)
        gate = _silu_gate(op, dq_name, producers, users)
        fn = torch_silu() if gate is not None else _table_function(op, dq_name, initializers, producers)
        found = requantize_chain(op, users, outputs)
        if fn is None or found is None or len(found[0]) != 1:
            continue
        quant = found[1]
        in_zero = initializers.get(producers[dq_name].input[2])
        table = _table(fn, source, in_zero, quant, initializers)
        if table is None:
            continue
        out_scale, out_zero = scalar_initializer(initializers, quant.input[1]), initializers[quant.input[2]]
        scale, tensor, in_min = source[1], source[0], quantized_range(in_zero)[0]
        if runtime_tables and op.op_type in RUNTIME_TABLE_OPS and table.size == 256 and runtime_table_matches(
                op.op_type, in_zero, float(scale), out_zero, float(out_scale.reshape(())), table):
            continue  # ONNX Runtime's own table kernel holds the same entries: leave the pattern to it
        nodes = _gather(graph, op.name or op.output[0], tensor, in_min, table, quant.output[0])
        replace_nodes(graph, [op, quant, *([] if gate is None else [gate])], nodes, quant)
        tables += 1
    if tables:
        drop_unused_dequantize(graph)
    return model, tables


def torch_silu():
    """torch's SiLU, the function of the table the integer program builds for `aten.silu`."""
    import torch

    return torch.ops.aten.silu.default


def _silu_gate(op: onnx.NodeProto, dq_output: str, producers: dict, users: dict) -> onnx.NodeProto | None:
    """The Sigmoid of `Mul(x, Sigmoid(x))` (a SiLU as torch exports it) when `op` is that Mul of
    the dequantized `dq_output` and nothing else reads the Sigmoid; None otherwise."""
    if op.op_type != "Mul" or len(op.input) != 2 or dq_output not in op.input:
        return None
    other = op.input[1] if op.input[0] == dq_output else op.input[0]
    gate = producers.get(other)
    if gate is None or gate.op_type != "Sigmoid" or list(gate.input) != [dq_output]:
        return None
    readers = users.get(other, [])
    return gate if len(readers) == 1 and readers[0] is op else None
