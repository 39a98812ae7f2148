"""Where each quantized layer of a prepared graph (`hatcli.quant.sensitivity.find_layers`) lives
in the graphs built from it: the node that carries its output, the parameters it reads, the
layers that feed it, its output grid, and the node of the integer program that computes it.

The debugger (`hat debug`) reads these to compare one layer across stages. A layer's *output*
is what its consumers read: the output fake quant (after a fused activation) in a prepared
graph, the integer op replacing it in the integer program; a layer without an output quantizer
(an accumulator that is a graph output) is its op's own result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from hatcli.quant.integer_kernels import int_add, int_lookup, int_mul, int_weighted
from hatcli.quant.op_sets import ADD_OPS, CLAMP_OPS, CONV_OPS, LINEAR_OPS, LUT_OPS, MUL_OPS
from hatcli.quant.quantizer import module_path
from hatcli.quant.sensitivity import QuantLayer, fake_quant_modules

QD = torch.ops.quantized_decomposed
WEIGHTED, ADD, MUL, TABLE = "weighted", "add", "mul", "table"
"""The kinds of layer op matched across graphs (a multiply by a constant becomes a table)."""
_PROGRAM_KINDS = {int_weighted: {WEIGHTED}, int_add: {ADD}, int_mul: {MUL}, int_lookup: {MUL, TABLE}}


@dataclass(frozen=True)
class OutputGrid:
    """The integer grid a layer's output is stored on: value = (code - zero_point) * scale."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    dtype: str

    @property
    def low(self) -> float:
        """The smallest value the grid holds."""
        return (self.qmin - self.zero_point) * self.scale

    @property
    def high(self) -> float:
        """The largest value the grid holds."""
        return (self.qmax - self.zero_point) * self.scale


def layer_kind(op: str) -> str:
    """The kind of a `QuantLayer.op` (`conv2d+relu` -> weighted, `add+relu` -> add, `sigmoid` -> table)."""
    head = op.split("+", 1)[0]
    if head.startswith(("conv", "linear")):
        return WEIGHTED
    if head in ("add", "sub"):
        return ADD
    if head in ("mul", "div"):
        return MUL
    return TABLE


class LayerGraph:
    """The layers of one prepared graph with the nodes, parameters, producers and grids of each
    (built once: every look-up below is by name)."""

    def __init__(self, prepared: GraphModule, layers: list[QuantLayer]) -> None:
        self.prepared = prepared
        self.layers = layers
        self.nodes = {node.name: node for node in prepared.graph.nodes}
        modules = fake_quant_modules(prepared)
        canonical = {id(m): name for name, m in modules.items()}
        self._fake_quant_name = {name: canonical[id(m)] for name, m in prepared.named_modules(remove_duplicate=False)
                                 if id(m) in canonical}
        self.outputs = {layer.name: self._output_node(layer) for layer in layers}

    def anchor(self, layer: QuantLayer) -> Node:
        """The layer's op node."""
        return self.nodes[layer.node]

    def anchor_path(self, layer: QuantLayer) -> str:
        """The module path of the layer's op itself, without the node suffix `find_layers` adds to
        names that are not unique ('' for an op of the top-level forward)."""
        return module_path(self.anchor(layer))

    def fake_quant(self, node: object) -> str | None:
        """The (first) name of the fake-quant module a node calls; None for any other node."""
        if not isinstance(node, Node) or node.op != "call_module":
            return None
        return self._fake_quant_name.get(str(node.target))

    def _output_node(self, layer: QuantLayer) -> Node:
        anchor = self.anchor(layer)
        owned = set(layer.modules)
        for node in self.prepared.graph.nodes:
            if self.fake_quant(node) not in owned or not node.args or not isinstance(node.args[0], Node):
                continue
            src = node.args[0]
            if src is anchor or (src.op == "call_function" and src.args and src.args[0] is anchor):
                return node
        last = anchor
        while len(last.users) == 1:
            user = next(iter(last.users))
            if user.op != "call_function" or user.target not in CLAMP_OPS:
                break
            last = user
        return last

    def output_node(self, layer: QuantLayer) -> Node:
        """The node whose value the layer's consumers read: its output fake quant, else (an
        accumulator left unquantized) the op, or the clamp fused after it."""
        return self.outputs[layer.name]

    def output_fake_quant(self, layer: QuantLayer) -> torch.nn.Module | None:
        """The layer's output fake-quant module (None: its output is not quantized)."""
        node = self.output_node(layer)
        return self.prepared.get_submodule(str(node.target)) if self.fake_quant(node) else None

    def parameter_targets(self, layer: QuantLayer) -> list[str]:
        """The attribute names of the weights and biases the layer's op reads (through their fake quants)."""
        targets = []
        for arg in self.anchor(layer).args:
            # through its fake quant, or the observer deriving an int32 bias's scale
            if isinstance(arg, Node) and arg.op == "call_module" and arg.args and isinstance(arg.args[0], Node):
                arg = arg.args[0]
            if isinstance(arg, Node) and arg.op == "get_attr":
                targets.append(str(arg.target))
        return targets

    def producers(self) -> dict[str, list[str]]:
        """For each layer, the layers whose outputs it reads (empty: the graph input only)."""
        by_output = {node.name: name for name, node in self.outputs.items()}
        order = {layer.name: i for i, layer in enumerate(self.layers)}
        found: dict[str, list[str]] = {}
        for layer in self.layers:
            stack, seen, names = list(self.anchor(layer).all_input_nodes), set(), set()
            while stack:
                node = stack.pop()
                if node.name in seen or node.op == "get_attr":
                    continue
                seen.add(node.name)
                if by_output.get(node.name, layer.name) != layer.name:
                    names.add(by_output[node.name])
                elif node.op != "placeholder":
                    stack.extend(node.all_input_nodes)
            found[layer.name] = sorted(names, key=order.__getitem__)
        return found

    def output_grid(self, layer: QuantLayer) -> OutputGrid | None:
        """The grid of the layer's output fake quant (None: the output is not quantized)."""
        module = self.output_fake_quant(layer)
        if module is None:
            return None
        scale, zero = module.calculate_qparams()
        return OutputGrid(float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]), int(module.quant_min),
                          int(module.quant_max), str(module.dtype).removeprefix("torch."))

    def accumulator_step(self, layer: QuantLayer) -> torch.Tensor | None:
        """The step of a conv / linear accumulator, per output channel: input scale x weight scale
        (what an unquantized accumulator output moves by); None for other layers."""
        args = self.anchor(layer).args
        if len(args) < 2 or not self.fake_quant(args[0]) or not self.fake_quant(args[1]):
            return None
        x_scale, _ = self.prepared.get_submodule(str(args[0].target)).calculate_qparams()
        w_scale, _ = self.prepared.get_submodule(str(args[1].target)).calculate_qparams()
        return (x_scale.reshape(-1)[:1] * w_scale.reshape(-1)).detach().double()

    def calibrated_range(self, layer: QuantLayer) -> tuple[float, float] | None:
        """The [min, max] the output's observer recorded in calibration (None: no such range)."""
        observer = getattr(self.output_fake_quant(layer), "activation_post_process", None)
        low, high = getattr(observer, "min_val", None), getattr(observer, "max_val", None)
        if not isinstance(low, torch.Tensor) or not isinstance(high, torch.Tensor) or low.numel() != 1:
            return None
        if not (torch.isfinite(low) and torch.isfinite(high)):
            return None
        return float(low), float(high)

    def weight(self, layer: QuantLayer) -> torch.Tensor | None:
        """The weight a conv / linear layer reads through its weight fake quant (None: no such weight)."""
        args = self.anchor(layer).args
        if len(args) < 2 or not self.fake_quant(args[1]) or not args[1].args:
            return None
        weight_node = args[1].args[0]
        if not isinstance(weight_node, Node) or weight_node.op != "get_attr":
            return None
        weight = graph_attribute(self.prepared, str(weight_node.target)).detach()
        return weight if weight.dim() >= 2 else None

    def weight_channels(self, layer: QuantLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the weight as one row per output channel, its per-channel scales) of a conv / linear
        layer; None for a layer without a per-channel weight quantizer."""
        weight = self.weight(layer)
        if weight is None:
            return None
        scale, _ = self.prepared.get_submodule(str(self.anchor(layer).args[1].target)).calculate_qparams()
        if scale.numel() != weight.shape[0]:
            return None
        return weight.reshape(weight.shape[0], -1), scale.detach().reshape(-1)


def graph_attribute(gm: GraphModule, target: str) -> torch.Tensor:
    """The tensor a `get_attr` target names on a graph module (`features.0.0.weight`)."""
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _program_kind(node: Node) -> set[str]:
    """The layer kinds an integer-program node can compute (empty for other nodes)."""
    if node.target in _PROGRAM_KINDS:
        return _PROGRAM_KINDS[node.target]
    if node.target in CONV_OPS or node.target in LINEAR_OPS:
        return {WEIGHTED}
    if node.target in ADD_OPS:
        return {ADD}
    if node.target in MUL_OPS:
        return {MUL}
    if node.target in CLAMP_OPS or node.target in LUT_OPS:
        return {TABLE}
    return set()


def _quantized_result(node: Node) -> Node:
    """A reference-form op's quantized result: the quantize after it (through a fused clamp), if any."""
    last = node
    while len(last.users) == 1:
        user = next(iter(last.users))
        if user.op == "call_function" and user.target in CLAMP_OPS:
            last = user
            continue
        if user.op == "call_function" and user.target == QD.quantize_per_tensor.default:
            return user
        break
    return last


def program_nodes(program: GraphModule, layers: list[tuple[str, str, str]]) -> dict[str, Node]:
    """The node of an integer program (`hatcli.quant.integer.integer_program`) that computes each
    layer's output, given as (name, module path of its op, kind) in graph order: the i-th op of
    a kind traced from a module is that module's i-th layer of the kind. Layers not found are left out."""
    candidates: dict[str, list[Node]] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and _program_kind(node):
            candidates.setdefault(module_path(node), []).append(node)
    found: dict[str, Node] = {}
    for name, path, kind in layers:
        pool = candidates.get(path, [])
        match = next((n for n in pool if kind in _program_kind(n)), None)
        if match is None:
            continue
        pool.remove(match)
        found[name] = match if match.target in _PROGRAM_KINDS else _quantized_result(match)
    return found
