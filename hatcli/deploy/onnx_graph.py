"""Walk an ONNX model as a list of *layers*: the ops an accelerator compiler would schedule.

A QDQ model (QuantizeLinear / DequantizeLinear around float ops) is read as the float graph it
describes, each tensor annotated with the integer dtype it is stored in:

- an activation `T -> Q -> DQ -> T'` is one logical tensor `T` of the Q's dtype (int8, uint8,
  int16...); weights `W_int8 -> DQ` are logical constants of their stored dtype;
- constant sub-graphs (initializers, `Constant`, `Shape` and whatever only consumes those) are
  folded away, as a static-shape compiler would;
- a layer is one op plus the activations a compiler fuses into it: Conv/Gemm/MatMul/Add followed
  by BatchNormalization, Relu, Clip, LeakyRelu, HardSwish/HardSigmoid or SiLU (`x * sigmoid(x)`).

Shapes come from `onnx.shape_inference` after the graph inputs are fixed to a static shape
(the batch dimension set to `batch`). Each layer carries MACs, element counts and dtypes so that
`check` and `perf` never have to look at raw nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hatcli.deploy.module_paths import layer_module
from hatcli.errors import UsageError

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
STATIC_SOURCE_OPS = {"Constant", "Shape", "Size", "ConstantOfShape"}
VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"}
"""Ops that only relabel a tensor: no data movement, no per-layer cost."""
DTYPE_PRESERVING_OPS = VIEW_OPS | {
    "Transpose", "MaxPool", "GlobalMaxPool", "Slice", "Split", "Pad", "Concat", "Gather",
    "DepthToSpace", "SpaceToDepth", "Tile", "Expand", "Resize", "Relu", "Clip",
}
"""Ops whose output keeps the (quantized) dtype of their input when no Q follows them."""
FUSION_HEADS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"}
FUSIBLE_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "PRelu", "Sigmoid", "Tanh"}
"""Activations a compiler applies on the accumulator of the op before them (LUT or clamp)."""
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass
class Layer:
    """One schedulable op after Q/DQ folding and activation fusion."""

    name: str
    op_type: str
    fused: list[str] = field(default_factory=list)
    """Op types fused into this layer (Relu, BatchNormalization, SiLU...)."""
    float_fused: list[str] = field(default_factory=list)
    """Fused ops whose input is a float tensor (no Q/DQ before them), e.g. torchao's
    `DQ -> Conv -> Relu -> Q`; a march must fuse these on the accumulator to run them."""
    nodes: list[str] = field(default_factory=list)
    """Names of the ONNX nodes folded into this layer (Q/DQ excluded)."""
    module: str = ""
    """Dotted path of the module the layer was traced from (`features.12.1`; "" for the root or
    when the exporter recorded none): see hatcli/deploy/module_paths.py."""
    attrs: dict[str, Any] = field(default_factory=dict)
    input_shapes: list[tuple[int, ...] | None] = field(default_factory=list)
    output_shapes: list[tuple[int, ...] | None] = field(default_factory=list)
    input_dtypes: list[str] = field(default_factory=list)
    """Dtype of each activation input: int8/uint8/int16/uint16 when quantized, else float32."""
    output_dtype: str = "float32"
    weight_shape: tuple[int, ...] | None = None
    weight_dtype: str | None = None
    const_elems: int = 0
    """Elements of every constant the layer reads (weights, biases, scales)."""
    const_bytes: int = 0
    macs: int = 0
    graph_output: bool = False
    """Whether this layer produces a graph output."""

    @property
    def is_view(self) -> bool:
        """True for reshape-like ops that move no data."""
        return self.op_type in VIEW_OPS

    @property
    def quantized(self) -> bool:
        """True when every activation input is an integer tensor and weights are integer."""
        ins = all(not d.startswith(("float", "bfloat")) for d in self.input_dtypes)
        w = self.weight_dtype is None or self.weight_dtype.startswith(("int", "uint"))
        return ins and w

    @property
    def is_depthwise(self) -> bool:
        """True for a grouped conv with one input channel per group."""
        if self.op_type != "Conv" or self.weight_shape is None:
            return False
        return int(self.attrs.get("group", 1)) > 1 and self.weight_shape[1] == 1

    def activation_bytes(self, assume: str | None = None) -> tuple[int, int]:
        """Bytes read from activation inputs and written to the output, by dtype.

        `assume` replaces float activation dtypes (e.g. "int8" to cost a not-yet-quantized graph).
        """
        def size(shape: tuple[int, ...] | None, dtype: str) -> int:
            if shape is None:
                return 0
            if assume and dtype.startswith("float"):
                dtype = assume
            return math.prod(shape) * itemsize(dtype)

        read = sum(size(s, d) for s, d in zip(self.input_shapes, self.input_dtypes))
        written = sum(size(s, self.output_dtype) for s in self.output_shapes)
        return read, written

    def weight_bytes(self, assume: str | None = None) -> int:
        """Bytes of constants read (weights at their dtype; `assume` re-costs float weights)."""
        if assume and self.weight_dtype is not None and self.weight_dtype.startswith("float"):
            return self.const_elems * itemsize(assume)
        return self.const_bytes


@dataclass
class TensorSpec:
    """Name, static shape (None for unknown dims) and dtype of a graph input or output."""

    name: str
    shape: list[int | None]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype}


@dataclass
class Graph:
    """A model read as layers, with its graph inputs/outputs."""

    path: str
    layers: list[Layer]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    quantized: bool
    """Whether the model contains any QuantizeLinear/DequantizeLinear."""
    opset: int
    batch: int


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name (int8 -> 1, float32 -> 4...)."""
    return int(np.dtype(dtype).itemsize) if dtype != "bfloat16" else 2


def _dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def resolve_model_path(path: str | Path) -> Path:
    """`path` itself, or `path/model.onnx` when `path` is an export or artifact directory."""
    p = Path(path)
    return p / "model.onnx" if p.is_dir() else p


def load_onnx(path: str | Path, external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file (or a directory's model.onnx); UsageError naming it if missing / not ONNX."""
    p = resolve_model_path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such ONNX file")
    try:
        model = onnx.load(str(p), load_external_data=external_data)
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise UsageError(f"{p} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise UsageError(f"{p} is not a readable ONNX model (empty graph)")
    return model


def _fix_input_shapes(model: onnx.ModelProto, batch: int, input_shape: list[int] | None) -> None:
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type"):
            continue
        dims = inp.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if input_shape is not None and i < len(input_shape) and i > 0:
                d.ClearField("dim_param")
                d.dim_value = int(input_shape[i])
            elif i == 0:
                d.ClearField("dim_param")
                d.dim_value = batch


def _shape_of(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return None if any(d is None for d in dims) else tuple(dims)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            continue
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        elif isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value).tolist()
        elif isinstance(value, (list, tuple)):
            value = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value]
        out[a.name] = value
    return out


def _q_dtype(node: onnx.NodeProto, elem: dict[str, str]) -> str:
    for a in node.attribute:
        if a.name == "output_dtype" and a.i:
            return _dtype_name(a.i)
    if len(node.input) > 2 and node.input[2] in elem:
        return elem[node.input[2]]
    return "uint8"


def _macs(op: str, layer: Layer, in_shapes: list[tuple[int, ...] | None]) -> int:
    out = layer.output_shapes[0] if layer.output_shapes else None
    w = layer.weight_shape
    if out is None:
        return 0
    if op == "Conv" and w is not None:
        return math.prod(out) * math.prod(w[1:])
    if op == "ConvTranspose" and w is not None and in_shapes and in_shapes[0] is not None:
        return math.prod(in_shapes[0]) * math.prod(w[1:])
    if op == "Gemm" and w is not None:
        k = w[0] if int(layer.attrs.get("transB", 0)) == 0 else w[1]
        return math.prod(out) * k
    if op == "MatMul":
        a = in_shapes[0] if in_shapes else None
        if a is not None:
            return math.prod(out) * a[-1]
    return 0


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return TensorSpec(vi.name, dims, _dtype_name(tt.elem_type))


class _Reader:
    """One pass over a shape-inferred graph: classify nodes, fold Q/DQ, fuse, build layers."""

    def __init__(self, g: onnx.GraphProto) -> None:
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        self.elem: dict[str, str] = {}
        for vi in [*g.input, *g.value_info, *g.output]:
            self.shapes[vi.name] = _shape_of(vi)
            if vi.type.HasField("tensor_type"):
                self.elem[vi.name] = _dtype_name(vi.type.tensor_type.elem_type)
        self.static: set[str] = set()
        self.stored: dict[str, str] = {}
        """Stored dtype of constants (a DQ'd int8 weight stays int8)."""
        self.const_elems: dict[str, int] = {}
        for t in g.initializer:
            self.shapes[t.name] = tuple(t.dims)
            self.elem[t.name] = self.stored[t.name] = _dtype_name(t.data_type)
            self.const_elems[t.name] = math.prod(t.dims)
            self.static.add(t.name)
        self.alias: dict[str, str] = {}
        self.qdtype: dict[str, str] = {}
        """Integer dtype of each logical (float-graph) tensor that is stored quantized."""
        self.graph_inputs = [i for i in g.input if i.name not in self.static]
        for inp in self.graph_inputs:
            if self.elem.get(inp.name, "float32").startswith(("int", "uint")):
                self.qdtype[inp.name] = self.elem[inp.name]
        self.has_qdq = False
        self.compute = [n for n in g.node if self._classify(n)]
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.compute:
            for i in node.input:
                if i and i not in self.static:
                    self.consumers.setdefault(self.resolve(i), []).append(node)
        self.graph_outputs = {self.resolve(o.name) for o in g.output}
        for node in reversed(self.compute):  # `op -> Reshape -> Q`: the op's output is requantized
            if node.op_type in VIEW_OPS and node.input and node.output:
                src, dst = self.resolve(node.input[0]), node.output[0]
                if dst in self.qdtype and src not in self.qdtype and src not in self.static \
                        and len(self.consumers.get(src, [])) == 1:
                    self.qdtype[src] = self.qdtype[dst]

    def resolve(self, name: str) -> str:
        """The logical tensor behind `name` (through Q -> DQ pairs)."""
        while name in self.alias:
            name = self.alias[name]
        return name

    def _classify(self, node: onnx.NodeProto) -> bool:
        """Record constants and Q/DQ; return True for a compute node."""
        ins = [i for i in node.input if i]
        self.has_qdq |= node.op_type in QDQ_OPS
        if node.op_type in STATIC_SOURCE_OPS or (ins and all(i in self.static for i in ins)):
            for o in node.output:
                self.static.add(o)
                if node.op_type in STATIC_SOURCE_OPS or not ins:
                    self.stored[o] = self.elem.get(o, "int64")
                    shape = self.shapes.get(o) or ()
                    self.const_elems[o] = math.prod(shape) if node.op_type == "Constant" else 0
                else:  # DQ of a stored weight, or a reshape / transpose of a constant
                    self.stored[o] = (_q_dtype(node, self.elem) if node.op_type == "QuantizeLinear"
                                      else self.stored.get(ins[0], "float32"))
                    self.const_elems[o] = self.const_elems.get(ins[0], 0)
            return False
        if node.op_type in QDQ_OPS:
            src = self.resolve(node.input[0])
            if node.op_type == "QuantizeLinear":
                self.qdtype.setdefault(src, _q_dtype(node, self.elem))
            else:
                self.qdtype.setdefault(src, self.elem.get(node.input[0], "int8"))
            self.alias[node.output[0]] = src
            return False
        return True

    def fuse_chain(self, head: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[str], list[str], str]:
        """Head op plus the activations fused after it: (nodes, fused names, float-fused, output)."""
        chain, names, floats, t = [head], [], [], head.output[0]
        bias = self.consumers.get(t, [])
        if (head.op_type == "MatMul" and len(head.input) > 1 and head.input[1] in self.static and len(bias) == 1
                and bias[0].op_type == "Add" and t not in self.graph_outputs and t not in self.qdtype
                and all(i == t or i in self.static for i in bias[0].input)):
            chain.append(bias[0])  # a linear on N-D tokens exports as MatMul + Add of its bias: one layer
            t = bias[0].output[0]
        while t not in self.graph_outputs:
            cons = self.consumers.get(t, [])
            if len(cons) == 1 and (cons[0].op_type in FUSIBLE_ACTIVATIONS or (
                    cons[0].op_type == "BatchNormalization" and len(chain) == 1
                    and head.op_type in {"Conv", "ConvTranspose"})):
                chain.append(cons[0])
                names.append(cons[0].op_type)
                if t not in self.qdtype:
                    floats.append(cons[0].op_type)
                t = cons[0].output[0]
                continue
            sig = next((c for c in cons if c.op_type == "Sigmoid"), None)
            mul = next((c for c in cons if c.op_type == "Mul"), None)
            if len(cons) == 2 and sig is not None and mul is not None \
                    and self.consumers.get(sig.output[0]) == [mul] \
                    and sig.output[0] not in self.graph_outputs:
                chain += [sig, mul]
                names.append("SiLU")
                if t not in self.qdtype or sig.output[0] not in self.qdtype:
                    floats.append("SiLU")
                t = mul.output[0]
                continue
            break
        return chain, names, floats, t

    def layer(self, node: onnx.NodeProto) -> tuple[Layer, list[onnx.NodeProto]]:
        """Build the layer headed by `node`; also return the nodes it absorbed."""
        chain, fused, floats, out = (self.fuse_chain(node) if node.op_type in FUSION_HEADS
                                     else ([node], [], [], node.output[0]))
        layer = Layer(name=node.name or node.output[0], op_type=node.op_type, fused=fused,
                      float_fused=floats if self.has_qdq else [],
                      nodes=[n.name for n in chain], module=layer_module(chain), attrs=_attrs(node))
        inner = {n.output[0] for n in chain[:-1]} | {node.output[0]}
        act_inputs: list[str] = []
        consts: list[str] = []
        for i in (i for n in chain for i in n.input if i):
            r = self.resolve(i)
            if i in self.static or r in self.static:
                consts.append(i)
            elif r not in inner and r not in act_inputs:
                act_inputs.append(r)
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in self.static:
            layer.weight_shape = self.shapes.get(node.input[1])
            layer.weight_dtype = self.stored.get(node.input[1], "float32")
        data = [c for c in dict.fromkeys(consts)
                if self.stored.get(c, "float32") not in ("int64", "string", "bool")]
        layer.const_elems = sum(self.const_elems.get(c, 0) for c in data)
        layer.const_bytes = sum(self.const_elems.get(c, 0) * itemsize(self.stored.get(c, "float32"))
                                for c in data)
        layer.input_shapes = [self.shapes.get(i) for i in act_inputs]
        layer.input_dtypes = [self.qdtype.get(i, self.elem.get(i, "float32")) for i in act_inputs]
        outs = [out] if len(chain) > 1 else [o for o in node.output if o]
        for o in outs:  # pooling / reshape / concat keep the input's integer dtype
            if o not in self.qdtype and node.op_type in DTYPE_PRESERVING_OPS and layer.input_dtypes \
                    and layer.input_dtypes[0] != "float32" and o not in self.graph_outputs:
                self.qdtype[o] = layer.input_dtypes[0]
        layer.output_shapes = [self.shapes.get(o) for o in outs]
        layer.output_dtype = (self.qdtype.get(outs[0], self.elem.get(outs[0], "float32"))
                              if outs else "float32")
        layer.graph_output = any(o in self.graph_outputs for o in outs)
        layer.macs = _macs(node.op_type, layer, layer.input_shapes)
        return layer, chain


def read_graph(
    model: str | Path | onnx.ModelProto, batch: int = 1, input_shape: list[int] | None = None
) -> Graph:
    """Read a model (path or ModelProto) as layers with static shapes at `batch`.

    `input_shape` (full shape, batch first) fixes dynamic non-batch input dims when the model has
    them. Raises UsageError when the file is missing or not an ONNX model.
    """
    if batch < 1:
        raise UsageError(f"batch must be >= 1 (got {batch})")
    if isinstance(model, onnx.ModelProto):
        path, proto = "<model>", onnx.ModelProto()
        proto.CopyFrom(model)
    else:
        path, proto = str(resolve_model_path(model)), load_onnx(model)
    _fix_input_shapes(proto, batch, input_shape)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - unknown/contrib ops: keep whatever shapes we have
        pass
    reader = _Reader(proto.graph)
    done: set[int] = set()
    layers: list[Layer] = []
    for node in reader.compute:
        if id(node) not in done:
            layer, chain = reader.layer(node)
            done.update(id(n) for n in chain)
            layers.append(layer)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return Graph(path=path, layers=layers, inputs=[_spec(i) for i in reader.graph_inputs],
                 outputs=[_spec(o) for o in proto.graph.output], quantized=reader.has_qdq,
                 opset=opset, batch=batch)
