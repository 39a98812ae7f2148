"""What each low-bit layer of a prepared graph trains with, recorded on the graph for the reports.

`prepare_quantized` calls `record_low_bit_layers` on the prepared graph: one `LowBitLayer` per
convolution / linear layer the plan gave a low-bit scheme (`MarchQuantizer.layer_bits`), with the
integer ranges its two fake quants put codes in (read off the modules themselves). The records
live in the graph's `meta` (under `GRAPH_META_KEY`), which `convert_pt2e` and `copy.deepcopy`
keep, so the integer program carries them to the export (`hatcli.deploy.export`), which writes
them into the manifest and the ONNX metadata for `hat check`; `hat calops` joins them with its
per-layer MACs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from torch.fx import GraphModule, Node

from hatcli.quant.low_bit.fake_quant import GridFakeQuantize
from hatcli.quant.low_bit.plan import LayerBits
from hatcli.quant.quantizer import module_path

GRAPH_META_KEY = "hat_low_bit_layers"
"""Where the records are kept in `GraphModule.meta`."""


@dataclass(frozen=True)
class LowBitLayer:
    """One low-bit layer: its module path, scheme, bit widths and the ranges of its codes."""

    module: str
    scheme: str
    weight_bits: int
    activation_bits: int
    weight_groups: int = 0
    weight_codes: tuple[int, int] | None = None
    """[quant_min, quant_max] of the weight's grid (None: not found, or levels that are no grid: LQ-Net)."""
    activation_codes: tuple[int, int] | None = None
    """[quant_min, quant_max] of the layer input's grid (None as for `weight_codes`)."""

    def describe(self) -> str:
        """`lsq W2A2` (with `/gG` when the weight has G scale groups)."""
        return LayerBits(self.scheme, self.weight_bits, self.activation_bits, self.weight_groups).describe()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (code ranges as two-element lists)."""
        out = asdict(self)
        for key in ("weight_codes", "activation_codes"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LowBitLayer:
        """The record `to_dict` wrote (keys it does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("weight_codes", "activation_codes"):
            if values.get(key) is not None:
                values[key] = (int(values[key][0]), int(values[key][1]))
        return cls(**values)


def _fake_quant(node: Any, modules: dict[str, Any]) -> GridFakeQuantize | None:
    module = modules.get(node.target) if isinstance(node, Node) and node.op == "call_module" else None
    return module if isinstance(module, GridFakeQuantize) else None


def _codes(module: GridFakeQuantize | None) -> tuple[int, int] | None:
    """The grid's integer range; None for levels that are not a uniform grid (no integer codes)."""
    return (module.quant_min, module.quant_max) if module is not None and module.integer else None


def record_low_bit_layers(prepared: GraphModule, layer_bits: dict[str, LayerBits]) -> list[LowBitLayer]:
    """Record on `prepared` (and return) the low-bit layers of `layer_bits`, in graph order, with
    the code ranges of the fake quants on each layer's input (`args[0]`) and weight (`args[1]`)."""
    modules = dict(prepared.named_modules())
    records: dict[str, LowBitLayer] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_function" or len(node.args) < 2:
            continue
        path = module_path(node) or node.name
        bits = layer_bits.get(path)
        if bits is None or path in records:
            continue
        weight, activation = _fake_quant(node.args[1], modules), _fake_quant(node.args[0], modules)
        if weight is None and activation is None:
            continue  # not the weighted op itself (an add or activation of the same module)
        records[path] = LowBitLayer(path, bits.scheme, bits.weight_bits, bits.activation_bits,
                                    bits.weight_groups, _codes(weight), _codes(activation))
    for path, bits in layer_bits.items():  # a layer whose fake quants were not found: bits alone
        records.setdefault(path, LowBitLayer(path, bits.scheme, bits.weight_bits, bits.activation_bits,
                                             bits.weight_groups))
    found = list(records.values())
    prepared.meta[GRAPH_META_KEY] = [r.to_dict() for r in found]
    return found


def low_bit_layers(graph: Any) -> list[LowBitLayer]:
    """The records `record_low_bit_layers` left on a prepared graph or its integer program ([]: none)."""
    meta = getattr(graph, "meta", None) or {}
    return [LowBitLayer.from_dict(entry) for entry in meta.get(GRAPH_META_KEY, [])]
