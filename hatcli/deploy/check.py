"""`check_model`: can a march run every op of an ONNX QDQ model, and what falls back to the CPU?

The model is read as layers (`onnx_graph.read_graph`: Q/DQ folded, activations fused), and each
layer is checked against the march profile's data: op support, kernel / stride / group limits,
and activation dtypes. Q/DQ nodes are not reported as ops; shape arithmetic is folded away.

The verdicts describe our model of the public documentation of each march (see the profile's
`sources`), not the vendor compiler.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from hatcli.deploy.bias_check import accumulator_overflow, bias_saturation
from hatcli.deploy.low_bit_check import LowBitVerdict, low_bit_verdict, read_low_bit_records
from hatcli.deploy.module_paths import module_scopes
from hatcli.deploy.onnx_graph import Graph, Layer, load_onnx, read_graph
from hatcli.quant.bias_range import AccumulatorOverflow, BiasSaturation
from hatcli.quant.march import MarchProfile

Status = Literal["BPU", "CPU fallback"]
BPU: Status = "BPU"
FALLBACK: Status = "CPU fallback"
_FUSED_OPS = {"SiLU": ["Sigmoid", "Mul"]}
_ALWAYS_FOLDED = {"BatchNormalization"}
"""Fused ops a compiler folds into the weights, whatever the march supports on its own."""
_INTEGER_FUSED = {"Relu", "Clip", "BatchNormalization"}
"""Fused ops that int_infer and the artifact apply to integers (`hatcli.quant.clamps`)."""


@dataclass
class CheckRow:
    """The verdict for one layer."""

    node: str
    op_type: str
    status: Status
    reason: str = ""
    fused: list[str] = field(default_factory=list)
    dtype: str = ""
    """Activation dtype the layer computes with (int8, uint8, int16, float32)."""
    module: str = ""
    """Dotted path of the module the layer was traced from ("" for the root)."""
    trained: str = ""
    """The low-bit scheme and bits the layer was trained with (`lsq W2A2`); "" for the march's own."""


@dataclass
class CheckReport:
    """The verdict for a model on a march."""

    model: str
    march: str
    quantized: bool
    """False for a float model: op support and limits are checked, dtypes are not."""
    rows: list[CheckRow]
    notes: list[str] = field(default_factory=list)
    bias_saturation: list[BiasSaturation] = field(default_factory=list)
    """Layers whose int32 bias saturates (`hatcli.deploy.bias_check`)."""
    accumulator_overflow: list[AccumulatorOverflow] = field(default_factory=list)
    """Layers whose accumulator can reach the march's limit (`QuantRules.accumulator_bits`)."""
    low_bit_layers: list[LowBitVerdict] = field(default_factory=list)
    """The layers a low-bit scheme trained (the export's record) and how the march runs each."""

    @property
    def fallbacks(self) -> int:
        """Number of layers that run on the CPU instead of the accelerator."""
        return sum(r.status == FALLBACK for r in self.rows)

    @property
    def supported(self) -> bool:
        """True when every layer runs on the accelerator."""
        return self.fallbacks == 0

    def fallback_ops(self) -> dict[str, int]:
        """Count of fallback layers per op type."""
        return dict(Counter(r.op_type for r in self.rows if r.status == FALLBACK))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (rows included)."""
        return {
            "model": self.model, "march": self.march, "quantized": self.quantized,
            "supported": self.supported, "fallbacks": self.fallbacks, "layers": len(self.rows),
            "fallback_ops": self.fallback_ops(), "notes": self.notes,
            "bias_saturation": [r.to_dict() for r in self.bias_saturation],
            "accumulator_overflow": [r.to_dict() for r in self.accumulator_overflow],
            "low_bit_layers": [v.to_dict() for v in self.low_bit_layers],
            "rows": [asdict(r) for r in self.rows],
        }


def _dtype_class(dtype: str) -> str:
    if dtype in ("int8", "uint8"):
        return "int8"
    if dtype in ("int16", "uint16"):
        return "int16"
    return dtype


def _pair(value: Any, default: int = 1) -> list[int]:
    if value is None:
        return [default]
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _is_spatial_mean(layer: Layer) -> bool:
    """Whether a layer maps N x C x H x W to N x C x 1 x 1 or N x C (a global pooling, `x.mean([2, 3])`)."""
    if not layer.input_shapes or not layer.output_shapes:
        return False
    x, y = layer.input_shapes[0], layer.output_shapes[0]
    if not (x and y) or len(x) != 4:
        return False
    return (len(y) == 4 and tuple(y[:2]) == tuple(x[:2]) and tuple(y[2:]) == (1, 1)) or tuple(y) == tuple(x[:2])


def _limit_reasons(layer: Layer, march: MarchProfile) -> list[str]:
    rule = march.ops.get(layer.op_type)
    if rule is None:
        return []
    reasons: list[str] = []
    kernel = layer.attrs.get("kernel_shape")
    if kernel is None and layer.weight_shape is not None and len(layer.weight_shape) > 2:
        kernel = list(layer.weight_shape[2:])
    if rule.max_kernel is not None and kernel and max(_pair(kernel)) > rule.max_kernel:
        shown = "x".join(str(k) for k in _pair(kernel))
        reasons.append(f"kernel {shown} exceeds {rule.max_kernel} on {march.name}")
    strides = _pair(layer.attrs.get("strides"))
    if rule.max_stride is not None and max(strides) > rule.max_stride:
        reasons.append(f"stride {max(strides)} exceeds {rule.max_stride} on {march.name}")
    if rule.spatial_mean_only and not _is_spatial_mean(layer):
        reasons.append(f"only a mean over H and W (global average pooling) runs in integers on {march.name}")
    group = int(layer.attrs.get("group", 1))
    if (rule.group_channel_multiple and group > 1 and not layer.is_depthwise
            and layer.weight_shape is not None):
        per_group = layer.weight_shape[1] if layer.op_type == "Conv" else layer.weight_shape[0] // group
        if per_group % rule.group_channel_multiple:
            reasons.append(f"grouped conv with {per_group} channels per group; {march.name} needs a "
                           f"multiple of {rule.group_channel_multiple}")
    return reasons


def check_layer(layer: Layer, march: MarchProfile, quantized_graph: bool) -> CheckRow:
    """Return the verdict for one layer on `march` (see `check_model`)."""
    dtypes = [*layer.input_dtypes, layer.output_dtype]
    compute = _dtype_class(layer.input_dtypes[0]) if layer.input_dtypes else _dtype_class(layer.output_dtype)
    row = CheckRow(node=layer.name, op_type=layer.op_type, status=BPU, fused=list(layer.fused),
                   dtype=compute, module=layer.module)
    reasons: list[str] = []
    needed = [layer.op_type]
    for f in layer.fused:
        if f not in _ALWAYS_FOLDED:
            needed += _FUSED_OPS.get(f, [f])
    missing = [op for op in dict.fromkeys(needed) if op not in march.ops]
    if missing:
        reasons.append(f"op {', '.join(missing)} not supported on {march.name}")
    reasons += _limit_reasons(layer, march)
    if quantized_graph:
        if not layer.quantized:
            what = "weights" if layer.input_dtypes and all(
                not d.startswith("float") for d in layer.input_dtypes) else "inputs"
            reasons.append(f"float compute: {what} not quantized")
        wide = sorted({_dtype_class(d) for d in dtypes if _dtype_class(d) not in ("float32", "int8")}
                      - {"float16", "float64", "bfloat16", "int32", "int64"})
        for cls in wide:
            if cls not in march.quant.activation_dtypes:
                reasons.append(f"{cls} activations not supported on {march.name} "
                               f"({'/'.join(march.quant.activation_dtypes)} only)")
        not_fused = [f for f in layer.float_fused if f not in march.fusible_activations]
        if not_fused:
            reasons.append(f"float {', '.join(not_fused)} after {layer.op_type}: {march.name} cannot "
                           "fuse it (quantize its input or use a supported activation)")
        if layer.weight_dtype is not None and layer.quantized and layer.weight_dtype != march.quant.weight_dtype:
            reasons.append(f"weights are {layer.weight_dtype}; {march.name} needs {march.quant.weight_dtype}")
    in_float = [f for f in layer.float_fused if f not in _INTEGER_FUSED]
    if reasons:
        row.status, row.reason = FALLBACK, "; ".join(reasons)
    elif quantized_graph and in_float:
        row.reason = (f"{', '.join(in_float)} fused after {layer.op_type}: not integer in int_infer or the host "
                      "artifact, which both apply it in float to the exact dequantized accumulator, each with "
                      "its own float function (they can differ by one output step)")
    elif quantized_graph and layer.graph_output and layer.output_dtype.startswith("float"):
        row.reason = ("float (dequantized) output" if march.quant.float_output else
                      "int32 accumulator output; the dequantize to float runs on the CPU")
    return row


def check_graph(graph: Graph, march: MarchProfile) -> CheckReport:
    """Check an already-read graph on `march` (see `check_model`)."""
    rows = [check_layer(layer, march, graph.quantized) for layer in graph.layers]
    notes: list[str] = []
    if not graph.quantized:
        notes.append("model is not quantized (no QuantizeLinear/DequantizeLinear): op support and "
                     "limits checked, dtypes not; check the exported QDQ model for the full verdict")
    if march.estimated:
        notes.append(f"{march.name} op support is our model of public documentation, "
                     "not the vendor compiler")
    return CheckReport(model=graph.path, march=march.name, quantized=graph.quantized, rows=rows,
                       notes=notes)


def check_model(onnx_path: str | Path, march: MarchProfile, batch: int = 1,
                input_shape: list[int] | None = None) -> CheckReport:
    """Check every layer of the ONNX model at `onnx_path` against `march`.

    A layer is a "CPU fallback" when its op (or a fused activation) is not in the march's `ops`,
    breaks a kernel / stride / group limit, computes in float inside a quantized graph, or uses
    int16 where the march has none. The layers a low-bit scheme trained (the export's record in
    the model's metadata) are listed with how the march runs them (`low_bit_layers`). Raises
    UsageError when the file is not an ONNX model.
    """
    graph = read_graph(onnx_path, batch=batch, input_shape=input_shape)
    report = check_graph(graph, march)
    if report.quantized:
        model = load_onnx(onnx_path)  # the integers behind the layers read_graph folded away
        report.bias_saturation = bias_saturation(model)
        report.accumulator_overflow = accumulator_overflow(model, march.quant.accumulator_bits)
        records = read_low_bit_records(model)
        if records:
            report.low_bit_layers = low_bit_verdicts(report, graph, model, records, march)
    return report


def low_bit_verdicts(report: CheckReport, graph: Graph, model: Any, records: list,
                     march: MarchProfile) -> list[LowBitVerdict]:
    """How `march` runs each recorded low-bit layer (`hatcli.deploy.low_bit_check`); marks the
    report's rows of those layers with their trained bits. A record names the conv / linear
    module itself (`features.1.0.0`), the innermost scope of the layer's head node, where the
    row shows the module enclosing the whole fused layer (`features.1.0`)."""
    scopes = {node.name: module_scopes(node) for node in model.graph.node}
    by_module: dict[str, list[CheckRow]] = {}
    for layer, row in zip(graph.layers, report.rows):
        if layer.weight_shape is None:
            continue  # not a conv / linear layer
        head = scopes.get(layer.nodes[0] if layer.nodes else layer.name)
        by_module.setdefault(head[-1] if head else row.module, []).append(row)
    verdicts = []
    for layer in records:
        rows = by_module.get(layer.module, [])
        for row in rows:
            row.trained = layer.describe()
        falling = [r.reason for r in rows if r.status == FALLBACK]
        verdicts.append(low_bit_verdict(layer, march, "; ".join(falling) or None))
    return verdicts
