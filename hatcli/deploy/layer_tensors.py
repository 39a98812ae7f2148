"""Which tensor of an exported / compiled ONNX model holds each layer's output, and a session that
returns those tensors beside the model's own outputs.

A layer is named as the quantized prepared graph names it: the module path of its op and the
kind of op (`weighted` conv / linear, `add`, `mul`, `table`: an elementwise function). The
exported QDQ model keeps, on every node, the scopes of the modules it was traced in
(`hatcli.deploy.module_paths`); the i-th op of a kind in a module is that module's i-th layer of
the kind. The layer's output is the tensor its QuantizeLinear writes (after the activations fused
behind the op), or the op's own result when it is not quantized (a graph output). The compiler
keeps those tensor names, so the same names address the compiled artifact, whose fused integer
kernels (QLinearConv, ...) write them; there the grid may be shifted (int8 becomes uint8 with
the zero point + 128, `hatcli.deploy.lowering`).

Reading intermediate tensors adds them as graph outputs on a copy of the model; nothing else
changes, and the model's own outputs come first, in their order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import numpy as np
import onnx
from onnx import helper, numpy_helper

from hatcli.deploy.module_paths import module_scopes
from hatcli.deploy.runtime import create_session

KINDS = {"Conv": "weighted", "ConvTranspose": "weighted", "Gemm": "weighted", "MatMul": "weighted",
         "Add": "add", "Sub": "add", "Mul": "mul", "Div": "mul",
         "Relu": "table", "Clip": "table", "Sigmoid": "table", "Tanh": "table", "HardSigmoid": "table",
         "HardSwish": "table", "Exp": "table", "LeakyRelu": "table", "Sign": "table"}
"""ONNX op type -> the kind of layer op it computes."""
FUSED_AFTER = {"Relu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu"}
"""Activations an op's output passes through before it is quantized."""
ONNX_DTYPES = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT16: "int16",
               onnx.TensorProto.UINT16: "uint16", onnx.TensorProto.INT32: "int32"}


@dataclass(frozen=True)
class LayerTensor:
    """The tensor holding one layer's output in the exported model, and the grid it is stored on."""

    tensor: str
    scale: float | None
    """None: a float tensor."""
    zero_point: int = 0
    dtype: str = "float32"


def _scope(node: onnx.NodeProto) -> str:
    scopes = module_scopes(node)
    return scopes[-1] if scopes else ""


def _output_of(head: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]], graph_outputs: set[str],
               inits: dict[str, onnx.TensorProto]) -> LayerTensor:
    """Follow a layer's op through its fused activations to the QuantizeLinear of its output."""
    tensor = head.output[0]
    fuses = KINDS.get(head.op_type) in ("weighted", "add")
    while fuses and tensor not in graph_outputs:
        users = consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type in FUSED_AFTER:
            tensor = users[0].output[0]
            continue
        types = {u.op_type: u for u in users}
        if len(users) == 2 and set(types) == {"Sigmoid", "Mul"} and \
                consumers.get(types["Sigmoid"].output[0]) == [types["Mul"]]:
            tensor = types["Mul"].output[0]  # SiLU as x * sigmoid(x)
            continue
        break
    users = consumers.get(tensor, [])
    if len(users) == 1 and users[0].op_type == "QuantizeLinear" and tensor not in graph_outputs:
        quant = users[0]
        scale = inits.get(quant.input[1])
        zero = inits.get(quant.input[2]) if len(quant.input) > 2 and quant.input[2] else None
        scales = numpy_helper.to_array(scale).reshape(-1) if scale is not None else np.zeros(0)
        if scales.size == 1:
            dtype = ONNX_DTYPES.get(zero.data_type, "int8") if zero is not None else "uint8"
            zero_value = int(numpy_helper.to_array(zero).reshape(-1)[0]) if zero is not None else 0
            return LayerTensor(quant.output[0], float(scales[0]), zero_value, dtype)
    return LayerTensor(tensor, None)


def export_layer_tensors(model: onnx.ModelProto, layers: list[tuple[str, str, str]]) -> dict[str, LayerTensor]:
    """The output tensor of each layer, given as (name, module path of its op, kind) in graph
    order, in an exported QDQ model; layers it cannot place are left out."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    candidates: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type in KINDS and not all(i in inits for i in node.input if i):
            candidates.setdefault(_scope(node), []).append(node)
    found: dict[str, LayerTensor] = {}
    for name, path, kind in layers:
        pool = candidates.get(path, [])
        match = next((n for n in pool if KINDS[n.op_type] == kind), None)
        if match is None:
            continue
        pool.remove(match)
        found[name] = _output_of(match, consumers, graph_outputs, inits)
    return found


def tensor_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor a node of the model writes."""
    return {out for node in model.graph.node for out in node.output}


class CaptureSession:
    """An ONNX Runtime session of a copy of `model_path` that also returns the tensors `names`."""

    def __init__(self, model_path: Path, names: list[str], level: str | int = "ORT_ENABLE_ALL",
                 threads: int | None = None) -> None:
        model = onnx.load(str(model_path))
        present = tensor_names(model)
        outputs = {o.name for o in model.graph.output}
        self.names = [n for n in dict.fromkeys(names) if n in present and n not in outputs]
        self.model_outputs = [o.name for o in model.graph.output]
        for name in self.names:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
        self.session = create_session(model.SerializeToString(), level, threads=threads,
                                      source=f"{model_path} (with intermediate outputs)")
        self.input_name = self.session.get_inputs()[0].name
        self.dtypes = {o.name: str(o.type).removeprefix("tensor(").rstrip(")") for o in self.session.get_outputs()}

    def run(self, batch: np.ndarray) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """The model's outputs, and the captured tensors by name, for one float32 batch."""
        values = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        count = len(self.model_outputs)
        return list(values[:count]), dict(zip(self.names, values[count:]))


def dequantize(codes: np.ndarray, ref: LayerTensor, stored_dtype: str) -> np.ndarray:
    """An artifact tensor as float values on the exported grid `ref`: an int8 tensor the compiler
    stored as uint8 has its zero point moved by 128; a float tensor is returned as it is."""
    if ref.scale is None or codes.dtype.kind == "f":
        return codes.astype(np.float32)
    zero = ref.zero_point + (128 if stored_dtype == "uint8" and ref.dtype == "int8" else 0)
    return ((codes.astype(np.float64) - zero) * ref.scale).astype(np.float32)
