"""Which graph nodes a low-bit plan can apply to: the first and last weighted layers (kept at int8
by `keep_first_last`) and per-channel scales (BatchNorms written as depthwise 1x1 convs)."""

from __future__ import annotations

from torch.fx import GraphModule, Node


def per_channel_scale(node: Node, conv_ops: set) -> bool:
    """A depthwise 1x1 conv: one weight per channel, a BatchNorm written as a conv (what
    `hatcli.quant.batchnorm` makes of an unfoldable one). It normalises, it does not mix features,
    so low-bit schemes leave it (and its input) at the march's int8."""
    weight = node.args[1] if len(node.args) > 1 else None
    value = weight.meta.get("val") if isinstance(weight, Node) else None
    if value is None and isinstance(weight, Node) and weight.op == "get_attr":
        value = weight.graph.owning_module.get_parameter(weight.target) if weight.graph.owning_module else None
    return (node.target in conv_ops and value is not None and value.dim() >= 3
            and all(d == 1 for d in value.shape[1:]))


def end_layers(model: GraphModule, weighted: set) -> tuple[set[Node], set[Node]]:
    """(first, last) weighted layers: those with no weighted layer before / after them."""
    nodes = [n for n in model.graph.nodes]
    is_weighted = {n: n.op == "call_function" and n.target in weighted for n in nodes}
    before: dict[Node, bool] = {}
    for n in nodes:
        before[n] = any(before[a] or is_weighted[a] for a in n.all_input_nodes)
    after: dict[Node, bool] = {}
    for n in reversed(nodes):
        after[n] = any(after[u] or is_weighted[u] for u in n.users)
    return ({n for n in nodes if is_weighted[n] and not before[n]},
            {n for n in nodes if is_weighted[n] and not after[n]})
