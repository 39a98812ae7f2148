"""`count_ops`: MACs, FLOPs and parameters of a torch model, in total and per leaf module.

Totals come from `torch.utils.flop_counter.FlopCounterMode`, which counts matmul / conv /
attention FLOPs (2 per multiply-accumulate), so MACs = FLOPs / 2 as in HAT's calops. The per-layer
table records, for each leaf module, the FLOPs counted while it ran (forward hooks). The model is
run on the `meta` device when it can be copied there, so large inputs count without computing.

`count_graph_ops` counts a graph instead (the integer program of `int_infer`): it runs the graph
node by node under the same counter and gives each node's FLOPs to the module the node was
traced from (`nn_module_stack`), so its table lines up with the float model's.

`apply_bits` adds what the low-bit literature reports beside MACs: bit-operations (BOPs = MACs x
weight bits x activation bits of each layer that multiplies) and weight memory (weight elements x
weight bits / 8 bytes), at the bits each layer trained with; layers without a low-bit record
count the march's int8 (8 / 8). The int8 and fp32 figures of the same network are given with
them, so the compression is visible. Both reports count this way from the start at int8.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from hatcli.errors import UsageError
from hatcli.quant.low_bit_records import LowBitLayer

INT8_BITS = 8
FP32_BITS = 32


@dataclass
class LayerOps:
    """One leaf module's share."""

    name: str
    type: str
    macs: int
    params: int
    output_shape: list[int] | None
    weights: int = 0
    """Elements of the layer's `weight` tensor (conv / linear); 0 for a layer without one."""
    scheme: str = ""
    """The low-bit scheme it trained with; "march" for the march's int8; "" when it multiplies nothing."""
    weight_bits: int | None = None
    activation_bits: int | None = None
    bops: int = 0
    """Bit-operations: MACs x weight_bits x activation_bits."""
    weight_bytes: float = 0.0
    """weights x weight_bits / 8 (the scales and int32 biases not included)."""


@dataclass
class OpsReport:
    """MACs / FLOPs / parameters of a model at one input shape."""

    input_shape: list[int]
    macs: int
    flops: int
    params: int
    device: str
    """"meta" when counted without computing, else "cpu"."""
    flops_by_op: dict[str, int] = field(default_factory=dict)
    layers: list[LayerOps] = field(default_factory=list)
    bops: int = 0
    """Bit-operations at the trained bits (`apply_bits`; int8 for every layer until then)."""
    bops_int8: int = 0
    """The same network at int8 (MACs x 64)."""
    bops_fp32: int = 0
    """The same network in fp32 (MACs x 1024)."""
    weight_bytes: float = 0.0
    """Weight memory of the multiplying layers at the trained bits."""
    weight_bytes_int8: int = 0
    weight_bytes_fp32: int = 0
    low_bit_layers: int = 0
    """Layers counted at a low-bit scheme's bits."""
    macs_outside_layers: int = 0
    """MACs no layer of the table ran (functional ops of a parent module); counted at int8 in the BOPs."""

    def ratios(self) -> dict[str, float | None]:
        """How many times smaller the int8 and fp32 references are at the trained bits (None: nothing counted)."""
        def ratio(reference: float, trained: float) -> float | None:
            return round(reference / trained, 3) if trained else None

        return {"weight_memory_vs_int8": ratio(self.weight_bytes_int8, self.weight_bytes),
                "weight_memory_vs_fp32": ratio(self.weight_bytes_fp32, self.weight_bytes),
                "bops_vs_int8": ratio(self.bops_int8, self.bops), "bops_vs_fp32": ratio(self.bops_fp32, self.bops)}

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (per-layer table and the `ratios` included)."""
        return {**asdict(self), "ratios": self.ratios()}


def _shape(output: Any) -> list[int] | None:
    if isinstance(output, torch.Tensor):
        return list(output.shape)
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return list(output[0].shape)
    if isinstance(output, dict):
        first = next((v for v in output.values() if isinstance(v, torch.Tensor)), None)
        return list(first.shape) if first is not None else None
    return None


def _to_meta(model: torch.nn.Module, example_input: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor] | None:
    try:
        meta_model = copy.deepcopy(model).to("meta")
    except Exception:  # noqa: BLE001 - some modules cannot be copied or moved: count on CPU
        return None
    return meta_model, torch.empty(example_input.shape, dtype=example_input.dtype, device="meta")


def _count(model: torch.nn.Module, x: torch.Tensor) -> tuple[FlopCounterMode, list[LayerOps]]:
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    counter = FlopCounterMode(display=False)
    rows: dict[str, LayerOps] = {}
    starts: dict[str, int] = {}
    handles = []

    def pre(name: str):
        def hook(_module: torch.nn.Module, _args: Any) -> None:
            starts[name] = counter.get_total_flops()
        return hook

    def post(name: str, module: torch.nn.Module):
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            flops = counter.get_total_flops() - starts.pop(name, counter.get_total_flops())
            row = rows.get(name)
            if row is None:  # first call; a module called again (shared) adds up
                params = sum(p.numel() for p in module.parameters(recurse=False))
                rows[name] = LayerOps(name, type(module).__name__, flops // 2, params, _shape(output),
                                      weights=weight_elements(module))
            else:
                row.macs += flops // 2
        return hook

    for name, module in leaves:
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name, module)))
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    order = [n for n, _ in leaves if n in rows]
    return counter, [rows[n] for n in order]


def count_ops(model: torch.nn.Module, example_input: torch.Tensor) -> OpsReport:
    """Count MACs (= FLOPs / 2 of matmul/conv), FLOPs and parameters of `model` on `example_input`.

    The model is deep-copied to the `meta` device when possible (no compute, no memory); the
    original model is never modified. Raises UsageError when the forward pass fails.
    """
    if not isinstance(example_input, torch.Tensor):
        raise UsageError("example_input must be a tensor (batch first)")
    was_training = model.training
    params = sum(p.numel() for p in model.parameters())
    attempts: list[tuple[str, torch.nn.Module, torch.Tensor]] = []
    meta = _to_meta(model, example_input)
    if meta is not None:
        attempts.append(("meta", meta[0].eval(), meta[1]))
    attempts.append(("cpu", model, example_input))
    error: Exception | None = None
    try:
        for device, net, x in attempts:
            if device == "cpu":
                model.eval()
            try:
                counter, layers = _count(net, x)
            except Exception as exc:  # noqa: BLE001 - meta kernels missing: retry on CPU
                error = exc
                continue
            by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
            flops = int(counter.get_total_flops())
            return apply_bits(OpsReport(input_shape=list(example_input.shape), macs=flops // 2, flops=flops,
                                        params=params, device=device, flops_by_op=by_op, layers=layers))
    finally:
        model.train(was_training)
    raise UsageError(f"cannot run the model on input {list(example_input.shape)}: {error}")


def _node_layer(node: torch.fx.Node) -> tuple[str, str]:
    """(module path, module type) a graph node was traced from; the node's own name otherwise."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, kind = list(stack.values())[-1]
        kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        return str(path), kind_name.rsplit(".", 1)[-1]
    return node.name, str(node.target).rsplit(".", 1)[-1]


def count_graph_ops(graph: torch.fx.GraphModule, example_input: torch.Tensor, params: int,
                    module_params: dict[str, int] | None = None,
                    module_weights: dict[str, int] | None = None) -> OpsReport:
    """Count MACs and FLOPs of a graph module (e.g. the integer program) on `example_input`,
    per traced module; `params` (the network's parameter count), `module_params` and
    `module_weights` (per module path, for the table: parameters, weight elements) are reported
    as given."""
    counter = FlopCounterMode(display=False)
    rows: dict[str, LayerOps] = {}

    class _Counting(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            before = counter.get_total_flops()
            out = super().run_node(node)
            flops = counter.get_total_flops() - before
            if flops:
                name, kind = _node_layer(node)
                own = (module_params or {}).get(name, 0)
                row = rows.setdefault(name, LayerOps(name, kind, 0, own, _shape(out),
                                                     weights=(module_weights or {}).get(name, 0)))
                row.macs += flops // 2
            return out

    try:
        with torch.no_grad(), counter:
            _Counting(graph).run(example_input)
    except Exception as exc:  # noqa: BLE001 - any failure of the forward pass is the user's input
        raise UsageError(f"cannot run the integer program on input {list(example_input.shape)}: {exc}") from None
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    flops = int(counter.get_total_flops())
    return apply_bits(OpsReport(input_shape=list(example_input.shape), macs=flops // 2, flops=flops, params=params,
                                device="cpu", flops_by_op=by_op, layers=list(rows.values())))


def weight_elements(module: torch.nn.Module) -> int:
    """Elements of a module's own `weight` parameter (0 when it has none)."""
    weight = getattr(module, "weight", None)
    return weight.numel() if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else 0


def apply_bits(report: OpsReport, low_bit: list[LowBitLayer] | None = None) -> OpsReport:
    """Fill the BOPs and weight memory of `report`, per layer and in total, at the bits of the
    `low_bit` records (matched by module path); every other layer that multiplies counts the
    march's int8. Returns `report`, changed in place."""
    by_path = {layer.module: layer for layer in low_bit or []}
    report.bops = report.bops_int8 = report.bops_fp32 = report.low_bit_layers = 0
    report.weight_bytes = 0.0
    report.weight_bytes_int8 = report.weight_bytes_fp32 = 0
    for row in report.layers:
        if not row.macs and not row.weights:
            row.scheme, row.weight_bits, row.activation_bits, row.bops, row.weight_bytes = "", None, None, 0, 0.0
            continue
        layer = by_path.get(row.name)
        if layer is None:
            row.scheme, row.weight_bits, row.activation_bits = "march", INT8_BITS, INT8_BITS
        else:
            row.scheme, row.weight_bits, row.activation_bits = layer.scheme, layer.weight_bits, layer.activation_bits
            report.low_bit_layers += 1
        row.bops = row.macs * row.weight_bits * row.activation_bits
        row.weight_bytes = row.weights * row.weight_bits / 8
        report.bops += row.bops
        report.bops_int8 += row.macs * INT8_BITS * INT8_BITS
        report.bops_fp32 += row.macs * FP32_BITS * FP32_BITS
        report.weight_bytes += row.weight_bytes
        report.weight_bytes_int8 += row.weights * INT8_BITS // 8
        report.weight_bytes_fp32 += row.weights * FP32_BITS // 8
    outside = report.macs - sum(row.macs for row in report.layers)
    report.macs_outside_layers = max(outside, 0)
    for bits, total in ((INT8_BITS, "bops"), (INT8_BITS, "bops_int8"), (FP32_BITS, "bops_fp32")):
        setattr(report, total, getattr(report, total) + report.macs_outside_layers * bits * bits)
    return report
