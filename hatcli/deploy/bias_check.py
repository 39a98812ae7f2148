"""Which conv / Gemm layers of an ONNX QDQ model carry a saturated int32 bias, and which can
reach the march's accumulator limit (int16 inputs, `QuantRules.accumulator_bits`).

The export records what conversion found (`hatcli.quant.bias_range.saturated_biases`: the float
bias and how far it is out of range) in the model's metadata under `METADATA_KEY`. A model
without that record (exported elsewhere, or before it existed) is read from its integers: a
bias at the end of its layer's range saturated; one at -2^31 wrapped (an int32 cast of 2^31).
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
from onnx import numpy_helper

from hatcli.deploy.graph_edit import index_graph
from hatcli.deploy.module_paths import layer_module
from hatcli.quant.bias_range import AccumulatorOverflow, BiasSaturation, accumulator_bound, bias_limit

METADATA_KEY = "hat.bias_saturation"


def write_bias_records(path: str, records: list[BiasSaturation]) -> None:
    """Store conversion's saturation records in the ONNX model at `path` (nothing when empty)."""
    if not records:
        return
    model = onnx.load(path)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps([r.to_dict() for r in records])
    onnx.save(model, path)


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
        fan_in = math.prod(weight.dims[1:]) if node.op_type == "Conv" else int(weight.dims[0 if _trans_b(node) == 0 else 1])
        q = numpy_helper.to_array(bias).astype(np.int64).reshape(-1)
        at_end = (np.abs(q) >= bias_limit(fan_in)) | (q == -(2**31))
        if not at_end.any():
            continue
        scale = numpy_helper.to_array(initializers[bias_dq.input[1]]).astype(np.float64).reshape(-1)
        worst = int(np.argmax(np.abs(q)))
        found.append(BiasSaturation(layer_module([node]) or node.name, int(at_end.sum()), q.size, worst, None,
                                    float(q[worst] * scale[worst if scale.size > 1 else 0])))
    return found


def _trans_b(node: onnx.NodeProto) -> int:
    return next((int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "transB"), 0)


def bias_saturation(path: str) -> list[BiasSaturation]:
    """The saturated biases of the ONNX model at `path`: its export record, else read from its
    int32 biases."""
    model = onnx.load(path, load_external_data=False)
    record = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if record is not None:
        return [BiasSaturation(**entry) for entry in json.loads(record)]
    return _from_integers(onnx.load(path))


def accumulator_overflow(path: str, bits: int) -> list[AccumulatorOverflow]:
    """The convs / Gemms of the ONNX model at `path` whose accumulator can pass `bits` (signed,
    saturating): their input range times their largest per-channel sum of |weights|, plus the
    bias, from the model's own integers."""
    model = onnx.load(path)
    initializers, producers, _, _ = index_graph(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        x_dq, weight_dq = producers.get(node.input[0]), producers.get(node.input[1])
        if any(n is None or n.op_type != "DequantizeLinear" or len(n.input) < 3 for n in (x_dq, weight_dq)):
            continue
        x_zero, weight = initializers.get(x_dq.input[2]), initializers.get(weight_dq.input[0])
        if x_zero is None or weight is None or len(weight.dims) < 2:
            continue
        info = np.iinfo(onnx.helper.tensor_dtype_to_np_dtype(x_zero.data_type))
        z = int(numpy_helper.to_array(x_zero).reshape(-1)[0])
        q_w = numpy_helper.to_array(weight).astype(np.int64)
        w_zero = initializers.get(weight_dq.input[2])
        q_w = q_w - (0 if w_zero is None else int(numpy_helper.to_array(w_zero).reshape(-1)[0]))
        if node.op_type == "Gemm" and _trans_b(node) == 0:
            q_w = q_w.T
        bias = 0
        bias_dq = producers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if bias_dq is not None and bias_dq.input[0] in initializers:
            bias = int(np.abs(numpy_helper.to_array(initializers[bias_dq.input[0]]).astype(np.int64)).max(initial=0))
        centred = q_w.reshape(q_w.shape[0], -1)
        bound = accumulator_bound(centred, max(abs(int(info.min) - z), abs(int(info.max) - z)), bias)
        if bound > 2 ** (bits - 1) - 1:
            found.append(AccumulatorOverflow(layer_module([node]) or node.name, info.dtype.name, centred.shape[1],
                                             bound, bits))
    return found
