"""BatchNorm in the exported deploy graph: folded into the convolution before it where that is
exact, otherwise rewritten as the equivalent depthwise 1x1 convolution.

torchao's `_fuse_conv_bn_` folds a BatchNorm into the convolution that feeds it even when that
convolution's output has other readers (the stem of a pre-activation ResNet feeds both the first
BatchNorm and the shortcut): the other readers then see the folded values, and the graph computes
something else (a pre-activation ResNet's logits moved by up to 5.6). A BatchNorm that does not
directly follow a convolution is not folded at all and would stay a float op. Both kinds are
rewritten here first, as `conv2d(x, scale[C,1,1,1], shift[C], groups=C)` with
`scale = gamma / sqrt(var + eps)` and `shift = beta - mean * scale`: the same values, an op
every march runs in int8, and trainable weights in QAT like a folded BatchNorm's.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

A = torch.ops.aten
BN_OPS = {A._native_batch_norm_legit_no_training.default, A.batch_norm.default}
CONV_OPS = {A.conv1d.default, A.conv2d.default, A.conv3d.default, A.conv_transpose1d.default,
            A.conv_transpose2d.input, A.conv_transpose3d.input}


def _constant(gm: GraphModule, node: object) -> torch.Tensor | None:
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value.detach()


def _foldable(bn: Node) -> bool:
    """The input is a convolution read by this BatchNorm alone (what folding keeps exact)."""
    source = bn.args[0]
    return (isinstance(source, Node) and source.op == "call_function" and source.target in CONV_OPS
            and len(source.users) == 1)


def _eps(bn: Node) -> float:
    if bn.target == A.batch_norm.default:
        return float(bn.args[7]) if len(bn.args) > 7 else 1e-5
    return float(bn.args[6]) if len(bn.args) > 6 else 1e-5


def unfoldable_bn_as_conv(gm: GraphModule) -> int:
    """Rewrite every BatchNorm that cannot be folded exactly as a depthwise 1x1 conv; how many.

    Only 4-D BatchNorms with constant statistics are rewritten (others are left as they are)."""
    graph, count = gm.graph, 0
    for bn in list(graph.nodes):
        if bn.op != "call_function" or bn.target not in BN_OPS or _foldable(bn):
            continue
        x = bn.args[0]
        value = x.meta.get("val") if isinstance(x, Node) else None
        mean, var = _constant(gm, bn.args[3]), _constant(gm, bn.args[4])
        if value is None or value.dim() != 4 or mean is None or var is None:
            continue
        channels = mean.numel()
        gamma = _constant(gm, bn.args[1])
        beta = _constant(gm, bn.args[2])
        gamma = torch.ones(channels) if gamma is None else gamma
        beta = torch.zeros(channels) if beta is None else beta
        scale = gamma / torch.sqrt(var + _eps(bn))
        shift = beta - mean * scale
        stem = f"_bn_as_conv_{count}"
        gm.register_parameter(f"{stem}_weight", torch.nn.Parameter(scale.reshape(channels, 1, 1, 1).float()))
        gm.register_parameter(f"{stem}_bias", torch.nn.Parameter(shift.float()))
        with graph.inserting_before(bn):
            weight = graph.get_attr(f"{stem}_weight")
            bias = graph.get_attr(f"{stem}_bias")
            conv = graph.call_function(A.conv2d.default, (x, weight, bias, [1, 1], [0, 0], [1, 1], channels))
        conv.meta.update({k: bn.meta[k] for k in ("nn_module_stack", "stack_trace", "source_fn_stack") if k in bn.meta})
        conv.meta["val"] = value
        if bn.target == A.batch_norm.default:
            bn.replace_all_uses_with(conv)
        else:  # a tuple (out, mean, rstd): its data output is getitem 0
            for user in list(bn.users):
                if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(conv)
        count += 1
    if count:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return count
