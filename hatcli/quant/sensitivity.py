"""Which fake quants belong to which layer of a prepared graph, and switching them one layer at a time.

The graph side of per-layer sensitivity (`hatcli.workflows.sensitivity` measures it). A *layer*
is the op that owns a group of fake quants: a conv / linear (its weight fake quant, the fake quant
on its output - after a fused ReLU - and, when its input is the graph input, the input one), an
add, or a ReLU quantized on its own. A fake quant shared by several ops (pooling and flatten keep
their input's scale) is one module and belongs to the op that produced it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import FakeQuantizeBase
from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

from hatcli.quant.quantizer import ANNOTATION_KEY, module_path


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


def sqnr_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` of summed squares; inf when the noise is zero."""
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
