"""`MarchQuantizer`: our torchao PT2E quantizer, configured from a march profile.

What it annotates (on the aten graph `torch.export` produces):
- conv2d / linear, with an optional following ReLU/ReLU6: int8 input (per tensor, zero point 0),
  int8 weight (symmetric, per output channel), int32 bias (scale = input scale x weight scale),
  output requantized unless it is a graph output (then the int32 accumulator is dequantized);
- add (+ReLU): int8 inputs, requantized output; cat: inputs and output share one scale;
- pooling, flatten/view/reshape, upsample: the output keeps the input's scale (no requantization).

All zero points are 0. Non-negative tensors (after ReLU) use the unsigned 8-bit grid where the
march allows it (`unsigned_after_relu`), which lets ONNX Runtime absorb the ReLU into QLinearConv.
Outputs of modules matched by `int16` patterns use int16. An op it does not know stays float and
is reported (`unquantized`); `hat check` shows it as a CPU fallback.
"""

from __future__ import annotations

import fnmatch
from functools import lru_cache
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import (
    FakeQuantize,
    MovingAveragePerChannelMinMaxObserver,
)
from torchao.quantization.pt2e.quantizer import (
    DerivedQuantizationSpec,
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
    SharedQuantizationSpec,
)

from hatcli.quant.march import MarchProfile
from hatcli.quant.observers import PercentileObserver, observer_class

A = torch.ops.aten
ANNOTATION_KEY = "quantization_annotation"

CONV_OPS = {A.conv2d.default, A.conv1d.default}
LINEAR_OPS = {A.linear.default}
RELU_OPS = {A.relu.default, A.relu_.default, A.hardtanh.default, A.hardtanh_.default}
ADD_OPS = {A.add.Tensor, A.add_.Tensor}
CAT_OPS = {A.cat.default, A.concat.default}
SCALE_PRESERVING_OPS = {
    A.adaptive_avg_pool2d.default, A.avg_pool2d.default, A.mean.dim, A.max_pool2d.default,
    A.flatten.using_ints, A.view.default, A.reshape.default, A.upsample_nearest2d.vec,
    A.upsample_nearest2d.default, A.permute.default, A.squeeze.dim, A.unsqueeze.default,
}
NEUTRAL_OPS = {A.dropout.default, A.dropout_.default}
"""Ops that vanish in eval mode: neither annotated nor reported."""


def _fake_quant(observer: type, **kwargs: object) -> object:
    return FakeQuantize.with_args(observer=observer, **kwargs)


@lru_cache(maxsize=None)
def activation_spec(dtype: str = "int8", unsigned: bool = False, observer: str = "minmax",
                    percentile: float = 99.99) -> QuantizationSpec:
    """Per-tensor activation spec with zero point 0: int8, uint8 (non-negative) or int16.

    `observer` picks the range statistic (`hatcli.quant.observers`): `minmax`, `percentile`
    (clips at the `percentile` of |x|) or `mse` (clips where quantization error is lowest).
    Cached, so equal arguments give the same spec object (and one observer class per graph).
    """
    if dtype == "int16":
        torch_dtype, qmin, qmax, scheme = torch.int16, -32768, 32767, torch.per_tensor_symmetric
    elif unsigned:
        # affine over [0, max] with the observed min clamped to 0 yields zero point 0
        torch_dtype, qmin, qmax, scheme = torch.uint8, 0, 255, torch.per_tensor_affine
    else:
        torch_dtype, qmin, qmax, scheme = torch.int8, -128, 127, torch.per_tensor_symmetric
    cls = observer_class(observer)
    extra = {"percentile": float(percentile)} if cls is PercentileObserver else {}
    ctr = _fake_quant(cls, dtype=torch_dtype, quant_min=qmin, quant_max=qmax, qscheme=scheme, **extra)
    return QuantizationSpec(dtype=torch_dtype, quant_min=qmin, quant_max=qmax, qscheme=scheme,
                            observer_or_fake_quant_ctr=ctr)


@lru_cache(maxsize=None)
def weight_spec() -> QuantizationSpec:
    """Symmetric int8 per output channel; the range follows the current weights at every step."""
    ctr = _fake_quant(MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0, dtype=torch.int8,
                      quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127,
                            qscheme=torch.per_channel_symmetric, ch_axis=0, observer_or_fake_quant_ctr=ctr)


def _derive_bias_qparams(obs_or_fqs: list) -> tuple[torch.Tensor, torch.Tensor]:
    act, weight = obs_or_fqs
    act_scale, _ = act.calculate_qparams()
    weight_scale, _ = weight.calculate_qparams()
    scale = (act_scale * weight_scale).to(torch.float32)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def bias_spec(node: Node, x: Node, w: Node) -> DerivedQuantizationSpec:
    """int32 bias whose scale is the product of the input and weight scales."""
    return DerivedQuantizationSpec(
        derived_from=[(x, node), (w, node)], derive_qparams_fn=_derive_bias_qparams,
        dtype=torch.int32, quant_min=-(2**31), quant_max=2**31 - 1,
        qscheme=torch.per_channel_symmetric, ch_axis=0,
    )


def module_path(node: Node) -> str:
    """Dotted name of the innermost module that produced `node` ('' at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self___", "")


@dataclass
class MarchQuantizer(Quantizer):
    """Annotates a graph for one march; `int16` holds module-name patterns computed in int16.

    `observer` (`minmax`, `percentile`, `mse`) and `percentile` choose the activation observers
    (the recipe's `calibration.observer`); weights always use per-channel min/max.
    """

    march: MarchProfile
    int16: list[str] = field(default_factory=list)
    observer: str = "minmax"
    percentile: float = 99.99
    unquantized: list[str] = field(default_factory=list)
    int16_nodes: list[str] = field(default_factory=list)

    # -- helpers ---------------------------------------------------------------------------
    def _output_spec(self, node: Node, non_negative: bool) -> QuantizationSpec:
        path = module_path(node)
        if self.int16 and any(fnmatch.fnmatch(path, p) for p in self.int16):
            self.int16_nodes.append(f"{path or node.name}")
            return self._activation_spec("int16")
        return self._activation_spec("int8", unsigned=non_negative and self.march.quant.unsigned_after_relu)

    def _activation_spec(self, dtype: str, unsigned: bool = False) -> QuantizationSpec:
        percentile = self.percentile if self.observer == "percentile" else 99.99
        return activation_spec(dtype, unsigned, self.observer, percentile)

    @staticmethod
    def _annotate(node: Node, inputs: dict | None = None, output: object = None) -> None:
        node.meta[ANNOTATION_KEY] = QuantizationAnnotation(
            input_qspec_map=inputs or {}, output_qspec=output, _annotated=True)

    def _input_spec(self, x: Node) -> QuantizationSpec | SharedQuantizationSpec:
        """Share the producer's quantizer when it has one, so no needless requantization."""
        annotation = x.meta.get(ANNOTATION_KEY)
        if annotation is not None and annotation.output_qspec is not None:
            return SharedQuantizationSpec(x)
        return self._activation_spec("int8")

    @staticmethod
    def _single_user(node: Node, ops: set) -> Node | None:
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target in ops:
            return users[0]
        return None

    @staticmethod
    def _is_graph_output(node: Node) -> bool:
        return any(user.op == "output" for user in node.users)

    def _annotate_weighted(self, node: Node) -> None:
        x, w = node.args[0], node.args[1]
        inputs = {x: self._input_spec(x), w: weight_spec()}
        if len(node.args) > 2 and isinstance(node.args[2], Node):
            inputs[node.args[2]] = bias_spec(node, x, w)
        last, relu = node, self._single_user(node, RELU_OPS)
        if relu is not None:
            last = relu
        out = None if self._is_graph_output(last) else self._output_spec(last, relu is not None)
        if last is node:
            self._annotate(node, inputs, out)
        else:
            self._annotate(node, inputs)
            self._annotate(last, output=out)

    # -- Quantizer API ---------------------------------------------------------------------
    def annotate(self, model: GraphModule) -> GraphModule:
        """Attach quantization annotations to every node we know how to quantize."""
        self.unquantized.clear()
        self.int16_nodes.clear()
        for node in model.graph.nodes:
            if node.op != "call_function" or ANNOTATION_KEY in node.meta:
                continue
            target = node.target
            if target in CONV_OPS or target in LINEAR_OPS:
                self._annotate_weighted(node)
            elif target in ADD_OPS and all(isinstance(a, Node) for a in node.args[:2]):
                relu = self._single_user(node, RELU_OPS)
                last = relu or node
                out = None if self._is_graph_output(last) else self._output_spec(last, relu is not None)
                inputs = {a: self._input_spec(a) for a in node.args[:2]}
                if relu is None:
                    self._annotate(node, inputs, out)
                else:
                    self._annotate(node, inputs)
                    self._annotate(relu, output=out)
            elif target in CAT_OPS:
                tensors = list(node.args[0])
                first = tensors[0]
                inputs = {first: self._input_spec(first)}
                inputs.update({t: SharedQuantizationSpec((first, node)) for t in tensors[1:]})
                self._annotate(node, inputs, SharedQuantizationSpec((first, node)))
            elif target in SCALE_PRESERVING_OPS and isinstance(node.args[0], Node):
                x = node.args[0]
                self._annotate(node, {x: self._input_spec(x)}, SharedQuantizationSpec((x, node)))
            elif target in RELU_OPS:
                x = node.args[0]
                self._annotate(node, {x: self._input_spec(x)}, self._output_spec(node, True))
            elif isinstance(target, torch._ops.OpOverload) and target not in NEUTRAL_OPS:
                self.unquantized.append(f"{node.name} ({target}) in `{module_path(node) or 'top'}`")
        return model

    def validate(self, model: GraphModule) -> None:
        """Nothing to validate beyond annotation: unsupported ops stay float by design."""
