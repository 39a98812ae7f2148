"""Per-layer quantization sensitivity: what quantizing *one* layer alone costs.

Built on the calibration checkpoint (the prepared graph with its recorded ranges). The reference
is that graph with every fake quant off (float outputs, BatchNorm folded). Then, for each
quantized layer, only its own fake quants are switched on and the val set is run again; the
layer's cost is the drop of the primary metric (top-1 for classification) and the SQNR of the
first output tensor against the reference, in dB: ``10 log10(sum ref^2 / sum (ref - q)^2)``.

A *layer* is the op that owns a group of fake quants: a conv / linear (its weight fake quant,
the fake quant on its output - after a fused ReLU - and, when its input is the graph input, the
input one), an add, or a ReLU quantized on its own. A fake quant shared by several ops (pooling
and flatten keep their input's scale) is one module and belongs to the op that produced it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import FakeQuantizeBase
from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

from hatcli.errors import ArtifactError, HatError

from hatcli.quant.quantizer import ANNOTATION_KEY, module_path

MAX_CACHED_BATCHES = 64
"""Val batches kept in memory between passes; beyond this the loader is read again each pass."""


@dataclass
class QuantLayer:
    """One quantized layer of a prepared graph and the fake-quant modules it owns."""

    name: str
    """Module path of the op (``features.3.0.0``), or its node name at the top level."""
    op: str
    """The op, with a fused ReLU: ``conv2d+relu``, ``linear``, ``add``..."""
    node: str
    """Graph node name of the op."""
    modules: list[str] = field(default_factory=list)
    """Names of the fake-quant modules (weight, output, graph input) this layer owns."""
    dtype: str = "float"
    """Dtype of the layer's output: its output fake quant's (int8, uint8, int16), ``int32`` for a
    conv/linear whose accumulator is the graph output, else ``float``."""
    int16_key: str | None = None
    """The exact `quant.int16` pattern that computes this layer's output in int16 (the module path
    of the node carrying the output fake quant: the fused ReLU's for conv+relu); None when the
    output is not quantized."""


@dataclass
class LayerSensitivity:
    """What quantizing one layer alone costs."""

    layer: str
    op: str
    dtype: str
    drop: float
    """Reference metric minus the metric with only this layer quantized (positive: worse)."""
    sqnr_db: float
    """SQNR of the first output tensor against the reference (inf when identical)."""
    metric: float
    """The metric with only this layer quantized."""
    int16_key: str | None = None
    enabled: int = 0
    """Fake-quant modules that were on while this layer was measured."""


@dataclass
class SensitivityReport:
    """Layers ranked by drop (largest first), then by SQNR (lowest first)."""

    recipe: str
    metric: str
    reference: float
    """The metric of the calibrated graph with every fake quant off (float)."""
    batches: int
    images: int
    layers: list[LayerSensitivity]

    def to_dict(self) -> dict[str, Any]:
        """The `--json` shape: recipe, metric, reference and the ranked layers."""
        layers = []
        for row in self.layers:
            item = asdict(row)
            item["drop"] = round(row.drop, 4)
            item["metric"] = round(row.metric, 4)
            item["sqnr_db"] = round(row.sqnr_db, 3) if math.isfinite(row.sqnr_db) else None
            layers.append(item)
        return {"recipe": self.recipe, "metric": self.metric, "reference": self.reference,
                "batches": self.batches, "images": self.images, "layers": layers}


# -- the graph: which fake quants belong to which op ---------------------------------------------


def fake_quant_modules(prepared: GraphModule) -> dict[str, FakeQuantizeBase]:
    """Every fake-quant module of a prepared graph, once each, by its first name."""
    return {name: m for name, m in prepared.named_modules() if isinstance(m, FakeQuantizeBase)}


def enabled_fake_quants(prepared: GraphModule) -> list[str]:
    """Names of the fake-quant modules whose fake quantization is on."""
    return [name for name, m in fake_quant_modules(prepared).items() if bool(m.fake_quant_enabled[0])]


def _opname(node: Node) -> str:
    name = getattr(node.target, "_opname", None) or getattr(node.target, "__name__", None) or str(node.target)
    return name.rstrip("_")


def _output_spec_of(node: Node) -> Any:
    annotation = node.meta.get(ANNOTATION_KEY)
    return getattr(annotation, "output_qspec", None)


def _owns_output(src: Node) -> bool:
    """Whether the fake quant after `src` is `src`'s own output quantizer (not a shared one)."""
    spec = _output_spec_of(src)
    return src.op == "call_function" and spec is not None and not isinstance(spec, SharedQuantizationSpec)


def _fused_head(act: Node) -> Node | None:
    """The conv / linear / add whose result `act` (a fused activation) quantizes, if any."""
    head = act.args[0] if act.args else None
    if (isinstance(head, Node) and head.op == "call_function" and ANNOTATION_KEY in head.meta
            and _output_spec_of(head) is None and len(head.users) == 1
            and head.meta[ANNOTATION_KEY].input_qspec_map):
        return head
    return None


def _consumer(node: Node) -> Node | None:
    """The op that reads a fake quant on the graph input (or on a tensor of a float op)."""
    users = [u for u in node.users if u.op == "call_function"]
    return users[0] if users else None


def find_layers(prepared: GraphModule) -> list[QuantLayer]:
    """Group the fake quants of a prepared graph by the op they belong to, in graph order.

    Reads the quantizer's annotations (kept in the prepared graph's node meta): a fake quant on a
    weight belongs to the op reading it; one on the output of an annotated op to that op (to the
    conv / linear / add when the op is an activation fused after it); one on the graph input or
    a float op's output to the op that reads it.
    """
    modules = fake_quant_modules(prepared)
    canonical = {id(m): name for name, m in modules.items()}
    layers: dict[str, QuantLayer] = {}
    owned: set[str] = set()
    pending_inputs: list[tuple[str, Node]] = []

    def layer_for(anchor: Node) -> QuantLayer:
        if anchor.name not in layers:
            layers[anchor.name] = QuantLayer(name=module_path(anchor) or anchor.name, op=_opname(anchor),
                                             node=anchor.name)
        return layers[anchor.name]

    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        module = prepared.get_submodule(node.target)
        if not isinstance(module, FakeQuantizeBase) or not node.args or not isinstance(node.args[0], Node):
            continue
        name = canonical[id(module)]
        if name in owned:
            continue  # a shared fake quant, already given to the op that produced it
        src = node.args[0]
        if src.op == "get_attr":  # a weight
            anchor = _consumer(node)
            if anchor is not None:
                layer = layer_for(anchor)
                layer.modules.append(name)
                owned.add(name)
                if layer.dtype == "float":
                    layer.dtype = "int32"  # until an output fake quant says otherwise
            continue
        if not _owns_output(src):  # the graph input, or a tensor coming out of a float op
            pending_inputs.append((name, node))
            continue
        head = _fused_head(src)
        layer = layer_for(head or src)
        if head is not None:
            layer.op = f"{_opname(head)}+{_opname(src)}"
        layer.modules.append(name)
        owned.add(name)
        layer.dtype = str(module.dtype).removeprefix("torch.")
        layer.int16_key = module_path(src) or None
    for name, node in pending_inputs:
        if name in owned:
            continue
        layer = layer_for(_consumer(node) or node.args[0])
        layer.modules.append(name)
        owned.add(name)
    order = {node.name: i for i, node in enumerate(prepared.graph.nodes)}
    found = sorted(layers.values(), key=lambda layer: order[layer.node])
    _unique_names(found)
    return found


def _unique_names(layers: list[QuantLayer]) -> None:
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    for layer in layers:
        if counts[layer.name] > 1:
            layer.name = f"{layer.name} ({layer.node})"


def enable_only(prepared: GraphModule, modules: Iterable[str] | None) -> None:
    """Switch fake quantization on for `modules` only (None: all of them; empty: none).

    Call `hatcli.quant.flow.set_mode(prepared, "eval")` first; observers are left as it set them.
    """
    keep = None if modules is None else set(modules)
    for name, module in fake_quant_modules(prepared).items():
        if keep is None or name in keep:
            module.enable_fake_quant()
        else:
            module.disable_fake_quant()


# -- measuring -----------------------------------------------------------------------------------


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)) and output:
        return _first_tensor(output[0])
    raise HatError(f"the model's output holds no tensor ({type(output).__name__})")


def sqnr_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` of summed squares; inf when the noise is zero."""
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


class _Batches:
    """Up to `limit` val batches, kept in memory when there are few, else read again each pass."""

    def __init__(self, loader: Any, limit: int | None) -> None:
        self.loader = loader
        self.count = len(loader) if limit is None else min(limit, len(loader))
        self.cached = list(itertools.islice(loader, self.count)) if self.count <= MAX_CACHED_BATCHES else None

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self.cached) if self.cached is not None else itertools.islice(self.loader, self.count)


def _new_metric(family: Any) -> tuple[str, Any]:
    from hatcli.engine.trainer import PRIMARY_METRIC
    from hatcli.metrics.classification import TopKAccuracy

    if family.task != "classification":
        raise HatError(f"sensitivity needs an evaluation of {family.task} models, not available in this version")
    return PRIMARY_METRIC[family.task], TopKAccuracy()


def _run_pass(prepared: GraphModule, batches: _Batches, family: Any,
              reference: list[torch.Tensor] | None) -> tuple[float, float, list[torch.Tensor]]:
    """One pass over the batches: (metric, SQNR dB vs `reference`, first outputs)."""
    key, metric = _new_metric(family)
    signal = noise = 0.0
    outputs: list[torch.Tensor] = []
    with torch.no_grad():
        for i, (images, labels) in enumerate(batches):
            out = prepared(images)
            metric.update(out, labels)
            first = _first_tensor(out).detach().float().cpu()
            if reference is None:
                outputs.append(first)
            else:
                ref = reference[i].double()
                signal += float((ref * ref).sum())
                noise += float(((ref - first.double()) ** 2).sum())
    return metric.compute()[key], sqnr_db(signal, noise), outputs


def rank(rows: list[LayerSensitivity]) -> list[LayerSensitivity]:
    """Largest drop first; among equal drops, lowest SQNR first."""
    return sorted(rows, key=lambda r: (-round(r.drop, 9), r.sqnr_db))


def measure_layers(prepared: GraphModule, layers: list[QuantLayer], loader: Any, family: Any,
                   batches: int | None = None, recipe: str = "") -> SensitivityReport:
    """Measure each layer of a calibrated prepared graph alone against the all-float reference."""
    from hatcli.progress import track
    from hatcli.quant.flow import set_mode

    metric_key, _ = _new_metric(family)
    data = _Batches(loader, batches)
    set_mode(prepared, "eval")
    enable_only(prepared, [])
    reference, _, ref_outputs = _run_pass(prepared, data, family, None)
    for module in fake_quant_modules(prepared).values():
        module.disable_observer()  # the weights' ranges were just taken; nothing changes them now
    rows = []
    for layer in track(layers, len(layers), "sensitivity"):
        enable_only(prepared, layer.modules)
        enabled = len(enabled_fake_quants(prepared))
        value, sqnr, _ = _run_pass(prepared, data, family, ref_outputs)
        rows.append(LayerSensitivity(layer=layer.name, op=layer.op, dtype=layer.dtype, drop=reference - value,
                                     sqnr_db=sqnr, metric=value, int16_key=layer.int16_key, enabled=enabled))
    enable_only(prepared, None)
    images = sum(int(t.shape[0]) for t in ref_outputs)
    return SensitivityReport(recipe=recipe, metric=metric_key, reference=reference, batches=data.count,
                             images=images, layers=rank(rows))


def calibration_checkpoint(lr: Any) -> Path:
    """The calibration checkpoint of `lr`, or an ArtifactError saying how to make it (or remake it)."""
    from hatcli.stages import read_stage_record, stage_dir, stage_fingerprint

    path = stage_dir(lr, "calibration") / "checkpoint.pt"
    if not path.exists():
        raise ArtifactError(f"no calibration checkpoint at {path}; run `hat train {lr.path} --stage calibration` "
                            f"first")
    record = read_stage_record(lr, "calibration")
    if record is not None and record.get("fingerprint") != stage_fingerprint(lr, "calibration"):
        raise ArtifactError(f"the calibration in {path.parent} was made from another recipe or float model "
                            f"(e.g. other `quant.int16`); run `hat train {lr.path} --stage calibration` again")
    return path


def layer_sensitivity(lr: Any, batches: int | None = None) -> SensitivityReport:
    """Rank the quantized layers of `lr`'s calibrated graph by what quantizing each alone costs.

    `batches` caps the val batches used (default: all). Raises ArtifactError when the calibration
    checkpoint is missing or stale.
    """
    from hatcli.engine.loaders import build_loader
    from hatcli.workflows.stage_models import load_prepared
    from hatcli.workflows.training import training_device

    path = calibration_checkpoint(lr)
    device = training_device(lr)
    prepared, _ = load_prepared(lr, "calibration", path)
    prepared = prepared.to(device)
    loader = build_loader(lr, "val", device=device)
    return measure_layers(prepared, find_layers(prepared), loader, lr.family, batches, recipe=str(lr.path))
