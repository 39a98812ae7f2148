"""Which conv / Gemm layers of an ONNX QDQ model carry a saturated int32 bias, and which can
reach the march's accumulator limit (int16 inputs, `QuantRules.accumulator_bits`).

The export records what conversion found (`hatcli.quant.bias_range.saturated_biases`: the float
bias and how far it is out of range) in the model's metadata under `METADATA_KEY`. A model
without that record (exported elsewhere, or before it existed) is read from its integers: a
bias at the end of its layer's range saturated; one at -2^31 wrapped (an int32 cast of 2^31).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from hatcli.deploy.graph_edit import accumulator_worst_case, index_graph, trans_b, weighted_operands
from hatcli.deploy.metadata import read_records, write_records
from hatcli.deploy.module_paths import layer_module
from hatcli.quant.bias_range import AccumulatorOverflow, BiasSaturation, bias_limit

METADATA_KEY = "hat.bias_saturation"


def write_bias_records(path: str, records: list[BiasSaturation]) -> None:
    """Store conversion's saturation records in the ONNX model at `path` (nothing when empty)."""
    write_records(path, METADATA_KEY, records)


def _from_integers(model: onnx.ModelProto) -> list[BiasSaturation]:
    initializers, producers, _, _ = index_graph(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        bias_dq, weight_dq = producers.get(node.input[2]), producers.get(node.input[1])
        if bias_dq is None or bias_dq.op_type != "DequantizeLinear" or bias_dq.input[0] not in initializers:
            continue
        bias = initializers[bias_dq.input[0]]
        if bias.data_type != onnx.TensorProto.INT32:
            continue
        weight = initializers.get(weight_dq.input[0]) if weight_dq is not None else None
        if weight is None or len(weight.dims) < 2:
            continue
        fan_in = math.prod(weight.dims[1:]) if node.op_type == "Conv" else int(weight.dims[1 if trans_b(node) else 0])
        q = numpy_helper.to_array(bias).astype(np.int64).reshape(-1)
        at_end = (np.abs(q) >= bias_limit(fan_in)) | (q == -(2**31))
        if not at_end.any():
            continue
        scale = numpy_helper.to_array(initializers[bias_dq.input[1]]).astype(np.float64).reshape(-1)
        worst = int(np.argmax(np.abs(q)))
        found.append(BiasSaturation(layer_module([node]) or node.name, int(at_end.sum()), q.size, worst, None,
                                    float(q[worst] * scale[worst if scale.size > 1 else 0])))
    return found


def bias_saturation(model: onnx.ModelProto) -> list[BiasSaturation]:
    """The saturated biases of `model`: its export record, else read from its int32 biases."""
    record = read_records(model, METADATA_KEY)
    if record is not None:
        return [BiasSaturation(**entry) for entry in record]
    return _from_integers(model)


def accumulator_overflow(model: onnx.ModelProto, bits: int) -> list[AccumulatorOverflow]:
    """The convs / Gemms of `model` whose accumulator can pass `bits` (signed, saturating): their
    input range times their largest per-channel sum of |weights|, plus the bias, from the model's
    own integers (`accumulator_worst_case`)."""
    initializers, producers, _, _ = index_graph(model.graph)
    found = []
    for node in model.graph.node:
        ops = weighted_operands(node, producers, initializers) if node.op_type in ("Conv", "Gemm") else None
        x_zero = None if ops is None else initializers.get(ops.x_dq.input[2])
        if x_zero is None:
            continue
        bound, fan_in = accumulator_worst_case(ops, x_zero, node)
        if bound > 2 ** (bits - 1) - 1:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(x_zero.data_type).name
            found.append(AccumulatorOverflow(layer_module([node]) or node.name, dtype, fan_in, bound, bits))
    return found
