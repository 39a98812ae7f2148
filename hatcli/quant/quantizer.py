"""`MarchQuantizer`: our torchao PT2E quantizer, configured from a march profile.

What it annotates (on the aten graph `torch.export` produces, BatchNorm already folded):

- conv / linear (+ a fused activation): int8 input (per tensor, zero point 0), int8 weight
  (symmetric, per output channel), int32 bias (scale = input scale x weight scale). The output is
  requantized, unless it is a graph output (then the int32 accumulator is dequantized).
- add / sub (+ a fused activation): each input keeps its producer's scale, the output gets its
  own; mul / div by a constant (the FCOS per-level scale, `x * 2.0`): the input keeps its
  producer's scale, the constant stays float (the runtime folds it into the output multiplier),
  the output gets its own scale; mul of two activations (squeeze-excite, `x * sigmoid(x)`): both
  inputs keep their scales, the output gets its own.
- fused activation: ReLU / ReLU6 / hardtanh / clamp always (a clamp of the accumulator: the op's
  own output is not quantized, one quantizer after the clamp); sigmoid, tanh, hardsigmoid,
  hardswish, GELU and SiLU when the march lists them in `fusible_activations`: a look-up table
  applied to the accumulator requantized onto an int16 grid (int8 on a march without int16), as
  the BPU does (`host` lists none, so ONNX Runtime gets a QLinearConv and a separate 8-bit table).
- matmul of two activations (attention): both inputs keep their scales, the output gets its own;
  softmax: the input keeps its producer's scale, the output is unsigned; LayerNorm over the last
  dimension with constant weight and bias: the input keeps its scale, the output gets its own.
  Tensors made from an input's shape alone (`x.new_zeros`: an attention mask) are constants.
- look-up-table ops on their own (sigmoid, tanh, hardsigmoid, hardswish, GELU, exp, SiLU): the input
  keeps its producer's scale, the output is requantized (a table maps input codes to output
  codes). A SiLU that cannot fuse is rewritten as `x * sigmoid(x)` before annotation, so both
  halves are integer ops (ONNX has no SiLU: a lone SiLU would leave a float Sigmoid -> Mul).
  Look-up-table outputs are quantized even at a graph output (a table yields integers).
- cat: all inputs and the output share one scale. When the inputs disagree in grid (signed and
  unsigned, int8 and int16) cat gets a signed (or int16) scale of its own and the inputs on the
  other grid are requantized: an unsigned grid would clip the negative inputs.
- scale-preserving ops, whose output shares the input's quantizer (no requantization): max pool
  (also `max_pool2d_with_indices`, through its first output), flatten / view / reshape / permute /
  squeeze / slice / split, nearest upsample, zero padding, and also average pooling, mean over H, W
  and bilinear upsample. The last three compute new values, but each is a convex combination of
  input values, so it stays inside the input's range: the input scale represents it without
  clipping, and re-using it costs at most half a step of rounding, whereas a fresh, finer scale
  would cost one more requantization and one more observer per tensor. ONNX Runtime's integer
  average pool and Resize kernels work the same way (same scale in and out).

All zero points are 0. Non-negative outputs (after ReLU / ReLU6 / clamp at >= 0, sigmoid,
hardsigmoid, exp, sums and products of non-negative tensors) use the unsigned 8-bit grid where the
march allows it (`unsigned_after_relu`), which doubles their resolution and lets ONNX Runtime
absorb a ReLU into QLinearConv. Outputs of modules matched by `int16` patterns use int16, and the
scale-preserving ops after them stay int16.

An op it does not know stays float and is reported (`unquantized`; the stages warn), and
`hat check` shows it as a CPU fallback. Dropout (an identity in eval mode) shares its input's
quantizer, like the scale-preserving ops; ops that compute on constants only, or do not return a
tensor (shape arithmetic) are neither annotated nor reported.
"""

from __future__ import annotations

import fnmatch
import operator
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

from hatcli.quant.bias_range import bias_limit
from hatcli.quant.bias_saturation import weight_fan_in
from hatcli.quant.low_bit.layers import end_layers, per_channel_scale
from hatcli.quant.low_bit.plan import LayerBits, QuantPlan
from hatcli.quant.low_bit.specs import grid_spec
from hatcli.quant.lsq import LsqFakeQuantize
from hatcli.quant.march import MarchProfile
from hatcli.quant.observers import PercentileObserver, observer_class
from hatcli.quant.op_sets import (
    ADD_OPS,
    CAT_OPS,
    CLAMP_OPS,
    CONSTANT_PAD_OPS,
    CONSTANT_CREATORS,
    CONV_OPS,
    DIV_OPS,
    LAYER_NORM_OPS,
    LINEAR_OPS,
    LUT_OPS,
    MATMUL_OPS,
    MULTI_OUTPUT_OPS,
    MUL_OPS,
    NEUTRAL_OPS,
    NON_NEGATIVE_LUTS,
    ONNX_ACTIVATION,
    PAD_OPS,
    SCALE_PRESERVING_OPS,
    SILU_OPS,
    SOFTMAX_OPS,
    SUB_OPS,
    clamp_bounds,
)

A = torch.ops.aten
ANNOTATION_KEY = "quantization_annotation"


def _fake_quant(observer: type, **kwargs: object) -> object:
    return FakeQuantize.with_args(observer=observer, **kwargs)


@lru_cache(maxsize=None)
def activation_spec(dtype: str = "int8", unsigned: bool = False, observer: str = "minmax",
                    percentile: float = 99.99, learned: bool = False) -> QuantizationSpec:
    """Per-tensor activation spec with zero point 0: int8, uint8 (non-negative) or int16.

    `observer` picks the range statistic (`hatcli.quant.observers`): `minmax`, `percentile`
    (clips at the `percentile` of |x|) or `mse` (clips where quantization error is lowest).
    `learned` (`qat.activation_scales = "learned"`) wraps the observer in `LsqFakeQuantize`
    (`hatcli.quant.lsq`), whose scale is a parameter QAT trains; otherwise torchao's
    `FakeQuantize`, whose scale stays frozen once calibrated. Both have the same state-dict keys.
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
    if learned:
        ctr = LsqFakeQuantize.with_args(observer=cls, dtype=torch_dtype, quant_min=qmin, quant_max=qmax,
                                        qscheme=scheme, **extra)
    else:
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
    """int32 bias whose scale is the product of the input and weight scales, in the range
    `hatcli.quant.bias_range.bias_limit` gives the layer (float32 ends, room for the accumulator)."""
    limit = bias_limit(weight_fan_in(w))
    return DerivedQuantizationSpec(
        derived_from=[(x, node), (w, node)], derive_qparams_fn=_derive_bias_qparams,
        dtype=torch.int32, quant_min=-limit, quant_max=limit,
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
    learned_scales: bool = False
    """`qat.activation_scales = "learned"`: activation fake quants are `LsqFakeQuantize`."""
    unquantized: list[str] = field(default_factory=list)
    int16_nodes: list[str] = field(default_factory=list)
    plan: QuantPlan | None = None
    """Low-bit schemes per layer (`[quant] scheme`, `hatcli.quant.low_bit.plan`); None: march rules."""
    schemes: dict[str, object] = field(default_factory=dict)
    """Scheme objects by name (`hatcli.quant.low_bit.schemes.Scheme`), for the plan's schemes."""
    layer_bits: dict[str, LayerBits] = field(default_factory=dict)
    """What each low-bit layer was annotated with, by module path (filled by `annotate`)."""
    _ends: tuple[set, set] = field(default_factory=lambda: (set(), set()))

    # -- helpers ---------------------------------------------------------------------------
    def _output_spec(self, node: Node, non_negative: bool, head: Node | None = None) -> QuantizationSpec:
        """The output quantizer of `node`; int16 when a pattern names its module, or the module of
        `head` (the conv / linear / add whose fused activation `node` is)."""
        path = module_path(node)
        paths = [path] + ([module_path(head)] if head is not None else [])
        if self.int16 and any(fnmatch.fnmatch(q, p) for q in paths for p in self.int16):
            self.int16_nodes.append(f"{path or node.name}")
            return self._activation_spec("int16")
        return self._activation_spec("int8", unsigned=non_negative and self.march.quant.unsigned_after_relu)

    def _activation_spec(self, dtype: str, unsigned: bool = False) -> QuantizationSpec:
        percentile = self.percentile if self.observer == "percentile" else 99.99
        return activation_spec(dtype, unsigned, self.observer, percentile, self.learned_scales)

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

    @staticmethod
    def _root_spec(x: Node) -> QuantizationSpec | None:
        """The spec that quantizes `x`'s output (through shared specs), or None if it is float."""
        annotation = x.meta.get(ANNOTATION_KEY)
        spec = annotation.output_qspec if annotation is not None else None
        for _ in range(1000):
            if not isinstance(spec, SharedQuantizationSpec):
                return spec
            target = spec.edge_or_node
            if isinstance(target, Node):
                annotation = target.meta.get(ANNOTATION_KEY)
                spec = annotation.output_qspec if annotation is not None else None
            else:
                src, user = target
                spec = user.meta[ANNOTATION_KEY].input_qspec_map.get(src)
        return None

    def _unsigned(self, x: object) -> bool:
        spec = self._root_spec(x) if isinstance(x, Node) else None
        return spec is not None and spec.dtype == torch.uint8

    def _fused_activation(self, head: Node) -> Node | None:
        """The activation applied on `head`'s result before requantization, if the march fuses it
        (ONNX has no fused form after a Sub, so none is fused there)."""
        act = None if head.target in SUB_OPS else self._single_user(head, CLAMP_OPS | LUT_OPS)
        if act is None or ONNX_ACTIVATION.get(act.target) not in self.march.fusible_activations:
            return None
        return act

    def _non_negative_activation(self, act: Node) -> bool:
        if act.target in CLAMP_OPS:
            bounds = clamp_bounds(act.target, act.args, act.kwargs)
            return bounds is not None and bounds.low is not None and bounds.low >= 0
        return act.target in NON_NEGATIVE_LUTS

    def _annotate_head(self, node: Node, inputs: dict, non_negative: bool = False) -> None:
        """Annotate conv / linear / add and the activation fused after it (one output quantizer)."""
        act = self._fused_activation(node)
        last = act or node
        if act is not None:
            non_negative = non_negative or self._non_negative_activation(act)
        accumulator_out = act is None or act.target in CLAMP_OPS
        out = None if accumulator_out and self._is_graph_output(last) else self._output_spec(last, non_negative, node)
        if act is None:
            self._annotate(node, inputs, out)
        elif act.target in CLAMP_OPS:
            self._annotate(node, inputs)
            self._annotate(act, output=out)
        else:
            # a fused table (sigmoid, SiLU, hardswish...): the accumulator is requantized onto an
            # int16 grid (int8 where the march has none) and the table maps it to the output, as a
            # BPU applies its look-up table; both int_infer and the artifact then compute integers
            wide = self._activation_spec("int16" if self.march.quant.allow_int16 else "int8")
            self._annotate(node, inputs, wide)
            self._annotate(act, {node: SharedQuantizationSpec(node)}, out)

    def _low_bit_layer(self, node: Node) -> LayerBits | None:
        if self.plan is None or not self.plan.low_bit or per_channel_scale(node, CONV_OPS):
            return None
        first, last = self._ends
        return self.plan.layer(module_path(node) or node.name, node in first, node in last)

    def _annotate_weighted(self, node: Node) -> None:
        x, w = node.args[0], node.args[1]
        layer = self._low_bit_layer(node)
        if layer is None:
            inputs = {x: self._input_spec(x), w: weight_spec()}
        else:
            scheme = self.schemes[layer.scheme]
            signed = not self._unsigned(x)
            inputs = {
                x: grid_spec(lambda: scheme.activation_quantizer(layer.activation_bits, signed), layer.scheme),
                w: grid_spec(lambda: scheme.weight_quantizer(layer.weight_bits, layer.weight_groups), layer.scheme),
            }
            self.layer_bits[module_path(node) or node.name] = layer
        if len(node.args) > 2 and isinstance(node.args[2], Node):
            inputs[node.args[2]] = bias_spec(node, x, w)
        self._annotate_head(node, inputs)

    def _annotate_arithmetic(self, node: Node, constants: set[Node]) -> bool:
        """add / sub / mul / div with one or two activation inputs; False when it cannot."""
        operands = list(node.args[:2])
        tensors = [a for a in operands if isinstance(a, Node) and a not in constants]
        if not tensors or len(operands) < 2:
            return False
        if node.target in DIV_OPS and operands[1] in tensors:
            return False  # division by an activation: no integer rule
        inputs = {a: self._input_spec(a) for a in tensors}
        # sums and products of non-negative tensors and numbers are non-negative; differences are not
        non_negative = node.target not in SUB_OPS and all(self._unsigned(t) for t in tensors) and all(
            isinstance(c, (int, float)) and c >= 0 for c in operands if c not in tensors)
        if node.target in ADD_OPS:
            self._annotate_head(node, inputs, non_negative)
        else:
            out = None if self._is_graph_output(node) else self._output_spec(node, non_negative)
            self._annotate(node, inputs, out)
        return True

    def _annotate_cat(self, node: Node) -> None:
        """One scale for every input and the output; a fresh one when the inputs' grids differ."""
        tensors = [t for t in node.args[0] if isinstance(t, Node)]
        first = tensors[0]
        dtypes = {spec.dtype if spec is not None else torch.int8
                  for spec in (self._root_spec(t) for t in tensors)}
        if len(dtypes) == 1 and self._root_spec(first) is not None:
            first_spec = SharedQuantizationSpec(first)
        else:
            first_spec = self._activation_spec("int16" if torch.int16 in dtypes else "int8")
        inputs = {first: first_spec}
        inputs.update({t: SharedQuantizationSpec((first, node)) for t in tensors[1:]})
        self._annotate(node, inputs, SharedQuantizationSpec((first, node)))

    def _annotate_matmul(self, node: Node, constants: set[Node]) -> bool:
        """matmul of two activations: both inputs keep their scales, the output gets its own
        (the attention's q k^T and attn v); False when an operand is a constant."""
        a, b = node.args[:2]
        if not all(isinstance(t, Node) and t not in constants for t in (a, b)):
            return False
        out = None if self._is_graph_output(node) else self._output_spec(node, self._unsigned(a) and self._unsigned(b))
        inputs = {a: self._input_spec(a)}
        if b is not a:
            inputs[b] = self._input_spec(b)
        self._annotate(node, inputs, out)
        return True

    def _annotate_layer_norm(self, node: Node, constants: set[Node]) -> bool:
        """LayerNorm over the last dimension with constant (or no) weight and bias: the input keeps
        its producer's scale, the output gets its own (signed); False for any other form."""
        x, shape = node.args[0], node.args[1]
        affine = [a for a in node.args[2:4] if a is not None]
        if not isinstance(shape, (list, tuple)) or len(shape) != 1 or any(
                not isinstance(a, Node) or a not in constants for a in affine):
            return False
        self._annotate(node, {x: self._input_spec(x)}, self._output_spec(node, False))
        return True

    def _annotate_multi_output(self, node: Node) -> None:
        """A tuple-returning op: the input edge here, the shared output on each data `getitem`."""
        x = node.args[0]
        self._annotate(node, {x: self._input_spec(x)})
        indices = MULTI_OUTPUT_OPS[node.target]
        for user in node.users:
            if user.target is operator.getitem and (indices is None or user.args[1] in indices):
                self._annotate(user, output=SharedQuantizationSpec((x, node)))

    def _silu_fuses(self, silu: Node) -> bool:
        head = silu.args[0]
        return (isinstance(head, Node) and head.op == "call_function"
                and head.target in CONV_OPS | LINEAR_OPS | ADD_OPS
                and self._fused_activation(head) is silu)

    # -- Quantizer API ---------------------------------------------------------------------
    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        """Rewrite each SiLU the march cannot fuse into its producer as `x * sigmoid(x)`."""
        graph, changed = model.graph, False
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in SILU_OPS or self._silu_fuses(node):
                continue
            x = node.args[0]
            with graph.inserting_after(node):
                sigmoid = graph.call_function(A.sigmoid.default, (x,))
            with graph.inserting_after(sigmoid):
                product = graph.call_function(A.mul.Tensor, (x, sigmoid))
            sigmoid.meta, product.meta = dict(node.meta), dict(node.meta)
            node.replace_all_uses_with(product)
            graph.erase_node(node)
            changed = True
        if changed:
            graph.lint()
            model.recompile()
        return model

    def annotate(self, model: GraphModule) -> GraphModule:
        """Attach quantization annotations to every node we know how to quantize."""
        self.unquantized.clear()
        self.int16_nodes.clear()
        self.layer_bits.clear()
        constants = _constant_nodes(model)
        self._ends = end_layers(model, CONV_OPS | LINEAR_OPS)
        for node in model.graph.nodes:
            if node.op != "call_function" or ANNOTATION_KEY in node.meta or node in constants:
                continue
            target, x = node.target, node.args[0] if node.args else None
            handled = True
            if target in CONV_OPS or target in LINEAR_OPS:
                self._annotate_weighted(node)
            elif target in ADD_OPS or target in MUL_OPS:
                handled = self._annotate_arithmetic(node, constants)
            elif target in CAT_OPS:
                self._annotate_cat(node)
            elif target in MATMUL_OPS:
                handled = self._annotate_matmul(node, constants)
            elif not isinstance(x, Node):
                handled = False
            elif target in MULTI_OUTPUT_OPS:
                self._annotate_multi_output(node)
            elif target in NEUTRAL_OPS:
                # dropout: an identity in eval mode; its output keeps its input's grid (a fresh
                # observer would requantize the tensor onto a second grid for nothing)
                if self._root_spec(x) is not None:
                    self._annotate(node, {x: SharedQuantizationSpec(x)}, SharedQuantizationSpec((x, node)))
                handled = True
            elif target in SCALE_PRESERVING_OPS and _preserves_scale(node):
                self._annotate(node, {x: self._input_spec(x)}, SharedQuantizationSpec((x, node)))
            elif target in CLAMP_OPS:
                self._annotate(node, {x: self._input_spec(x)},
                               self._output_spec(node, self._non_negative_activation(node)))
            elif target in LUT_OPS:
                self._annotate(node, {x: self._input_spec(x)},
                               self._output_spec(node, target in NON_NEGATIVE_LUTS))
            elif target in SOFTMAX_OPS:
                self._annotate(node, {x: self._input_spec(x)}, self._output_spec(node, True))
            elif target in LAYER_NORM_OPS:
                handled = self._annotate_layer_norm(node, constants)
            else:
                handled = False
            if not handled and _reportable(node):
                self.unquantized.append(f"{node.name} ({target}) in `{module_path(node) or 'top'}`")
        return model

    def validate(self, model: GraphModule) -> None:
        """Nothing to validate beyond annotation: unsupported ops stay float by design."""


def _constant_nodes(model: GraphModule) -> set[Node]:
    """Parameters, buffers, tensors made from an input's shape alone (`x.new_zeros`), and whatever is
    computed from them alone (folded at export)."""
    constants: set[Node] = set()
    for node in model.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and (
                node.target in CONSTANT_CREATORS or all(a in constants for a in node.all_input_nodes))):
            constants.add(node)
    return constants


def _preserves_scale(node: Node) -> bool:
    """Zero padding keeps the scale (0 is exact); other values and modes do not."""
    if node.target not in PAD_OPS:
        return True
    if node.target in CONSTANT_PAD_OPS:  # constant_pad_nd(x, pad, value=0)
        mode, value = "constant", node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    else:  # pad(x, pad, mode="constant", value=None)
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    return mode == "constant" and not value


def _reportable(node: Node) -> bool:
    """An op we leave in float that the user should hear about (it returns a tensor)."""
    if not isinstance(node.target, torch._ops.OpOverload) or node.target in NEUTRAL_OPS:
        return False
    value = node.meta.get("val")
    return value is None or isinstance(value, torch.Tensor)
