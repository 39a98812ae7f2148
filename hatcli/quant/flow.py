"""The quantization flow: deploy graph -> prepared (observers / fake quant) -> integer program.

Calibration and QAT share one prepared graph (as in HAT): calibration runs it with observers on
and fake quant off in eval mode; QAT trains it with fake quant on and activation scales frozen
(or learned, LSQ: `qat.activation_scales`, `hatcli.quant.lsq`);
`int_infer` converts it. BatchNorm is folded into the convolutions before the graph is prepared,
so QAT trains exactly the weights that are deployed (and conversion needs no pattern rewriting).

Checkpoints hold the prepared graph's state dict, not the graph: the graph is rebuilt from the
recipe (deterministic node names) and the state loaded into it, with `weights_only=True`.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Literal

import torch

# torchao registers an Enum with torch's pytree at import, which logs a deprecation notice
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
from torch.export import Dim
from torch.fx import GraphModule
from torchao.quantization.pt2e import (
    FakeQuantizeBase,
    move_exported_model_to_eval,
    move_exported_model_to_train,
)
from torchao.quantization.pt2e import export_utils as _export_utils
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.utils import _fuse_conv_bn_

from hatcli.errors import RecipeError, warn
from hatcli.family import ModelFamily
from hatcli.quant.batchnorm import unfoldable_bn_as_conv
from hatcli.quant.bias_saturation import saturated_biases
from hatcli.quant.low_bit.bias import quantize_low_bit_biases
from hatcli.quant.low_bit.conversion import clamp_narrow_grids, narrow_quantizes, prepare_conversion
from hatcli.quant.low_bit.plan import QuantPlan
from hatcli.quant.low_bit_records import record_low_bit_layers
from hatcli.quant.march import MarchProfile
from hatcli.quant.quantizer import MarchQuantizer, module_path

Mode = Literal["calibrate", "train", "eval"]


def batch_dynamic_shapes(example: tuple) -> tuple:
    """Dynamic-shape spec that frees the batch dimension of every example input."""
    batch = Dim("batch", min=1, max=4096)
    return tuple({0: batch} for _ in example)


def export_deploy_graph(family: ModelFamily, float_model: torch.nn.Module,
                        input_size: tuple[int, int]) -> GraphModule:
    """Export the family's deploy model in eval mode and fold BatchNorm into the convolutions
    (those that cannot be folded exactly become depthwise 1x1 convs: `hatcli.quant.batchnorm`)."""
    deploy = family.build_deploy_model(float_model).eval()
    example = family.example_inputs(tuple(input_size), batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(deploy, example, dynamic_shapes=batch_dynamic_shapes(example))
    graph = program.module()
    unfoldable_bn_as_conv(graph)  # torchao would fold into a conv whose output others read too
    _fuse_conv_bn_(graph)
    return graph


def prepare_quantized(family: ModelFamily, float_model: torch.nn.Module, input_size: tuple[int, int],
                      march: MarchProfile, int16: list[str], observer: str = "minmax",
                      percentile: float = 99.99, activation_scales: str = "frozen",
                      plan: QuantPlan | None = None, schemes: dict[str, object] | None = None,
                      ) -> tuple[GraphModule, MarchQuantizer]:
    """Return the prepared (fake-quant) graph of the deploy model, and the quantizer used.

    `observer` / `percentile` choose the activation observers (`calibration.observer`); the
    calibration and QAT stages must pass the same ones, so a checkpoint loads into the rebuilt graph.
    `activation_scales` (`qat.activation_scales`) is `frozen` (torchao `FakeQuantize`: QAT keeps
    the calibrated scales) or `learned` (`hatcli.quant.lsq.LsqFakeQuantize`: QAT trains them, LSQ);
    both fake quants have the same state-dict keys, so either kind of checkpoint loads into either graph.
    `plan` and `schemes` give layers a low-bit scheme (`hatcli.quant.low_bit`): `schemes` maps
    every scheme name the plan uses to its scheme object; the low-bit layers are recorded in the
    graph's `meta` (`hatcli.quant.low_bit_records`), which conversion keeps for the export.
    """
    if activation_scales not in ("frozen", "learned"):
        raise RecipeError(f"`qat.activation_scales` is {activation_scales!r}; choose \"frozen\" or \"learned\"")
    if int16 and not march.quant.allow_int16:
        raise RecipeError(f"`quant.int16` asks for int16 but march `{march.name}` has no int16 "
                          f"activations; remove the patterns or choose another march")
    quantizer = MarchQuantizer(march=march, int16=list(int16), observer=observer, percentile=percentile,
                               learned_scales=activation_scales == "learned", plan=plan,
                               schemes=dict(schemes or {}))
    graph = export_deploy_graph(family, float_model, input_size)
    prepared = prepare_qat_pt2e(graph, quantizer)
    quantize_low_bit_biases(prepared)  # low-bit layers: QAT rounds the int32 bias as deployed
    record_low_bit_layers(prepared, quantizer.layer_bits)
    return prepared, quantizer


def _is_weight_fq(module: FakeQuantizeBase) -> bool:
    return getattr(module, "ch_axis", -1) == 0 and module.qscheme in (
        torch.per_channel_symmetric, torch.per_channel_affine)


_EXPORTED_TRAINING_ATTR = getattr(_export_utils, "_EXPORTED_TRAINING_ATTR", "_exported_training")
"""The flag torchao's `move_exported_model_to_train` / `_to_eval` keep on the graph."""


def _has_mode_dependent_ops(prepared: GraphModule) -> bool:
    """Whether the graph calls dropout or batch norm, the ops torchao rewrites between train and eval."""
    return any(n.op == "call_function" and ("dropout" in str(n.target) or "batch_norm" in str(n.target))
               for n in prepared.graph.nodes)


def set_mode(prepared: GraphModule, mode: Mode) -> None:
    """Switch a prepared graph between calibration, QAT training and evaluation.

    - calibrate: eval mode, every observer on, fake quant off (float outputs; ranges recorded;
      a learned-scale fake quant copies its observer's scale into its parameter);
    - train: train mode, fake quant on, activation observers off, weight ranges follow weights;
    - eval: eval mode, fake quant on, activation observers off, weight ranges follow weights.

    With the activation observers off the activation scales only change through the optimizer:
    never for `FakeQuantize` (frozen; a buffer), by gradient descent for `LsqFakeQuantize`
    (learned; a parameter, which `calculate_qparams` then returns for conversion).

    torchao's train/eval switch re-exports dropout and batch-norm patterns to rewrite them (a few
    seconds on a small CPU, at every switch); a graph that holds neither op (BatchNorm is folded
    before prepare) only has its mode flag set.
    """
    if not _has_mode_dependent_ops(prepared):
        setattr(prepared, _EXPORTED_TRAINING_ATTR, mode == "train")
    elif mode == "train":
        move_exported_model_to_train(prepared)
    else:
        move_exported_model_to_eval(prepared)
    for module in prepared.modules():
        if not isinstance(module, FakeQuantizeBase):
            continue
        if mode == "calibrate":
            module.disable_fake_quant()
            module.enable_observer()
        else:
            module.enable_fake_quant()
            if _is_weight_fq(module):
                module.enable_observer()
            else:
                module.disable_observer()


def convert_to_integer(prepared: GraphModule) -> GraphModule:
    """Convert a calibrated or QAT-trained graph into the integer program (int8 weights, int32
    biases, quantize/dequantize around every quantized op).

    A layer whose int32 bias saturates (`hatcli.quant.bias_range.saturated_biases`) is warned
    about, and listed in the program's `bias_saturation` attribute (`BiasSaturation` records)."""
    set_mode(prepared, "eval")
    prepare_conversion(prepared)  # low-bit schemes: weights baked onto their grid, sign made explicit
    saturation = saturated_biases(prepared, lambda node: module_path(node) or node.name)
    for record in saturation:
        warn(record.describe())
    with torch.no_grad():
        integer = convert_pt2e(prepared)
    integer.bias_saturation = saturation
    return integer


def _global_pools(model: GraphModule) -> list:
    """The `adaptive_avg_pool2d(x, 1)` nodes of a program."""
    return [n for n in model.graph.nodes if n.op == "call_function"
            and n.target == torch.ops.aten.adaptive_avg_pool2d.default and list(n.args[1]) == [1, 1]]


def _global_pools_as_means(model: GraphModule) -> None:
    """Rewrite every `adaptive_avg_pool2d(x, 1)` as `mean(x, [-2, -1], keepdim=True)` (the same values)."""
    for node in _global_pools(model):
        node.target = torch.ops.aten.mean.dim
        node.args = (node.args[0], [-2, -1], True)
    model.recompile()


def export_program(integer_model: GraphModule, example: tuple) -> torch.export.ExportedProgram:
    """Capture the integer program as an ExportedProgram with a free batch dimension; quantizes onto
    narrow (low-bit) grids are followed by an explicit clamp, which ONNX needs (its QuantizeLinear
    saturates to the whole 8-bit range). A global average pool is written as the mean over H and W
    it is: torch's export decomposes `adaptive_avg_pool2d` of a permuted (channels-last) tensor
    into a mean and an `as_strided` copy, which would leave the mean without its quantize."""
    if narrow_quantizes(integer_model):
        integer_model = copy.deepcopy(integer_model)
        clamp_narrow_grids(integer_model)
    if _global_pools(integer_model):
        integer_model = copy.deepcopy(integer_model)
        _global_pools_as_means(integer_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(integer_model, example, dynamic_shapes=batch_dynamic_shapes(example))
