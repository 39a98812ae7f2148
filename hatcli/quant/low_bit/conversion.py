"""What low-bit fake quants need around `convert_pt2e` and export.

Before conversion (`prepare_conversion`, on the prepared graph in eval mode):

- a scheme whose levels are not a uniform grid (`integer = False`: LQ-Net) is refused with the
  reason (a `UsageError`), instead of writing an integer program that computes something else;
- every scheme weight is *baked*: replaced by its fake-quantized value. `convert_pt2e` quantizes
  the weight tensor itself with the quantizer's scale, and a scheme's weight function is more than
  a rounding of that tensor (DoReFa's tanh, XNOR's sign), so without this the codes would differ
  from what QAT trained; baked, `round(w_q / scale)` gives exactly the trained codes;
- an `explicit_op` (XNOR's sign) is written into the graph in front of its quantizer, so the
  integer program and the artifact compute it as an op of its own (a table on the int8 input)
  and the quantizer only puts its result on the grid.

Before export (`clamp_narrow_grids`, on the converted program): ONNX's QuantizeLinear saturates to
its type's whole range (0..255 for uint8), while a b-bit grid is narrower, so an explicit clamp of
the integer codes follows every quantize onto a narrow per-tensor grid. Per-channel quantizes (the
weights) are folded into constants by conversion and need none.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from hatcli.quant.low_bit.fake_quant import GridFakeQuantize

QUANTIZE = {torch.ops.quantized_decomposed.quantize_per_tensor.default}
CLAMP = torch.ops.aten.clamp.Tensor
DTYPE_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767),
                torch.uint16: (0, 65535), torch.int32: (-2 ** 31, 2 ** 31 - 1)}


def grid_quantizers(model: torch.nn.Module) -> list[tuple[str, GridFakeQuantize]]:
    """Every scheme fake quant of `model`, named, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GridFakeQuantize)]


def _attr_owner(gm: GraphModule, target: str) -> tuple[torch.nn.Module, str]:
    *path, last = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, last


def prepare_conversion(prepared: GraphModule) -> int:
    """Refuse non-uniform schemes, bake scheme weights, write explicit ops; the number of changes.

    `prepared` must be in eval mode (`hatcli.quant.flow.set_mode(prepared, "eval")`); it is changed
    in place, as `convert_pt2e` changes it anyway.
    """
    modules = dict(prepared.named_modules())
    for _, module in grid_quantizers(prepared):
        if not module.integer:
            module.grid_ready()  # raises with the scheme's reason
    changes = 0
    graph = prepared.graph
    for node in list(graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(module, GridFakeQuantize):
            continue
        source = node.args[0]
        if module.per_channel and isinstance(source, torch.fx.Node) and source.op == "get_attr":
            owner, name = _attr_owner(prepared, source.target)
            weight = getattr(owner, name)
            with torch.no_grad():
                baked = module(weight.detach()).detach().clone()
            if isinstance(weight, torch.nn.Parameter):
                setattr(owner, name, torch.nn.Parameter(baked, requires_grad=False))
            else:
                setattr(owner, name, baked)
            changes += 1
        if module.explicit_op is not None:
            with graph.inserting_before(node):
                op = graph.call_function(module.explicit_op, (source,))
            op.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace", "val") if k in node.meta})
            node.args = (op, *node.args[1:])
            changes += 1
    if changes:
        graph.lint()
        prepared.recompile()
    return changes


def narrow_quantizes(gm: GraphModule) -> list[torch.fx.Node]:
    """The per-tensor quantize nodes whose [quant_min, quant_max] is narrower than their dtype's."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in QUANTIZE:
            qmin, qmax, dtype = node.args[3], node.args[4], node.args[5]
            if dtype in DTYPE_RANGES and (int(qmin), int(qmax)) != DTYPE_RANGES[dtype]:
                found.append(node)
    return found


def clamp_narrow_grids(gm: GraphModule) -> int:
    """Follow each narrow-grid quantize with a clamp of its codes (see the module docstring);
    the number of clamps written. A no-op in torch (the quantize already clamps)."""
    graph = gm.graph
    count = 0
    for node in narrow_quantizes(gm):
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target == CLAMP:
            continue
        # bounds as tensors of the codes' own type: ONNX's Clip wants min and max of its input's type
        bounds = []
        for which, value in (("min", node.args[3]), ("max", node.args[4])):
            name = f"_narrow_grid_{which}_{count}"
            gm.register_buffer(name, torch.tensor(int(value), dtype=node.args[5]))
            with graph.inserting_before(node):
                bounds.append(graph.get_attr(name))
        with graph.inserting_after(node):
            clamp = graph.call_function(CLAMP, (node, *bounds))
        clamp.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace", "val") if k in node.meta})
        for user in users:
            user.replace_input_with(node, clamp)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count
