"""Which conv / linear layers of a calibrated or trained prepared graph have a float bias that
their int32 range (`hatcli.quant.bias_range.bias_limit`) cannot hold."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.fx import GraphModule, Node

from hatcli.quant.bias_range import BiasSaturation, bias_limit

CONV_OPS = ("conv1d", "conv2d", "linear")


def _fan_in(weight: Node | torch.Tensor) -> int | None:
    value = weight.meta.get("val") if isinstance(weight, Node) else weight
    shape = getattr(value, "shape", None)
    return None if shape is None or len(shape) < 2 else int(math.prod(shape[1:]))


def weight_fan_in(weight: Node) -> int:
    """The number of products each output of the layer with weight node `weight` sums (8-bit
    worst case when the shape is unknown: a 3x3x1024 conv)."""
    return _fan_in(weight) or 3 * 3 * 1024


def _module(gm: GraphModule, node: object) -> torch.nn.Module | None:
    if isinstance(node, Node) and node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def _constant(gm: GraphModule, node: object) -> torch.Tensor | None:
    if isinstance(node, Node) and node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    return None


def saturated_biases(prepared: GraphModule, layer_name: Callable[[Node], str] = lambda node: node.name,
                     ) -> list[BiasSaturation]:
    """Every conv / linear of a calibrated or trained prepared graph whose float bias, quantized
    with its derived scale, leaves the int32 range it is given (`bias_limit`); `layer_name` names
    a layer by its node."""
    found = []
    for node in prepared.graph.nodes:
        name = node.target.name() if isinstance(node.target, torch._ops.OpOverload) else ""
        if node.op != "call_function" or name.split("::")[-1].split(".")[0] not in CONV_OPS or len(node.args) < 3:
            continue
        bias_fq = _module(prepared, node.args[2])
        bias = _constant(prepared, node.args[2].args[0]) if bias_fq is not None and node.args[2].args else None
        if bias_fq is None or bias is None or not hasattr(bias_fq, "calculate_qparams"):
            continue
        scale, _ = bias_fq.calculate_qparams()
        scale = scale.detach().to(torch.float32).reshape(-1).expand(bias.numel())
        bias = bias.detach().to(torch.float32).reshape(-1)
        steps = bias / scale
        limit = float(getattr(bias_fq, "quant_max", None) or bias_limit(weight_fan_in(node.args[1])))
        over = steps.abs() > limit
        if not bool(over.any()):
            continue
        worst = int(torch.argmax(steps.abs()))
        kept = math.copysign(limit, float(steps[worst])) * float(scale[worst])
        found.append(BiasSaturation(layer_name(node), int(over.sum()), bias.numel(), worst,
                                    float(bias[worst]), kept))
    return found
