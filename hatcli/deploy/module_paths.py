"""Which module of the network an ONNX node was traced from.

The dynamo ONNX exporter records, on every node, the scopes of the modules it was called in
(`metadata_props["pkg.torch.onnx.name_scopes"]`, e.g. `['', 'features', 'features.12',
'features.12.1', 'features.12.1.0', 'conv2d_26']`: the root, each enclosing module by its
dotted path, then the fx node). A layer that fuses several nodes (conv + bn + relu) belongs to
the deepest module enclosing all of them (`features.12.1`), which is the path a user writes in a
recipe (`quant.int16`) or finds in `print(model)`. A fused op called in an enclosing module's
own forward (`torch.relu(self.dw(x))`) leaves the head's module as it is (`dw`).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable

import onnx

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def module_scopes(node: onnx.NodeProto) -> list[str] | None:
    """The dotted paths of the modules enclosing `node`, outermost first (the root `''`
    included), or None when the exporter recorded none."""
    text = next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), None)
    if text is None:
        return None
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        return None
    return scopes[:-1]  # the last entry is the fx node itself


def layer_module(nodes: Iterable[onnx.NodeProto]) -> str:
    """The dotted path of the module a layer (its head node first) was traced from: the deepest
    module enclosing the head and the fused nodes inside it; `""` for the root module (an op
    written in the top-level forward) or when the nodes carry no scopes."""
    common: list[str] | None = None
    for node in nodes:
        scopes = module_scopes(node)
        if scopes is None:
            continue
        if common is None:
            common = scopes
            continue
        if common[:len(scopes)] == scopes:  # called in an enclosing module's forward
            continue
        size = 0
        while size < min(len(common), len(scopes)) and common[size] == scopes[size]:
            size += 1
        common = common[:size]
    return common[-1] if common else ""
