"""What the fitted latency model reads from a graph: a few work counts per fused block.

A *block* is one `Layer` of `hatcli.deploy.onnx_graph` (a conv / matmul / add with the activations
fused into it, or an op on its own); reshape-like views are free and are not blocks. Each block
contributes to a handful of features, each in a unit that keeps the fitted coefficients readable
(milliseconds per unit):

    frame              1 per model: the fixed cost of running one frame (input, dispatch, output)
    dense_gmac         10^9 MACs of dense convolutions and linear layers, output channels rounded
                       up to the march's channel alignment, input channels to its input alignment
    depthwise_gmac     10^9 MACs of depthwise convolutions, channels aligned
    grouped_gmac       10^9 MACs of other grouped convolutions, channels per group aligned
    matmul_gmac        10^9 MACs of activation x activation MatMuls (attention)
    activation_mb      10^6 bytes of activations read and written by BPU blocks
    weight_mb          10^6 bytes of weights and other constants
    elementwise_melem  10^6 output elements of BPU blocks without MACs (add, pool, concat, pad, ...)
    table_melem        10^6 output elements of look-up-table work the march does not fuse (sigmoid,
                       tanh, exp, softmax; SiLU where it is a table then a multiply)
    resize_melem       10^6 output elements of Resize / upsampling
    block              1 per block the accelerator runs (its fixed dispatch cost)
    cpu_melem          10^6 elements read and written by blocks that fall back to the CPU
    cpu_block          1 per CPU fallback block (its transfer and synchronisation)

The model is `latency = sum(coefficient[f] * feature[f])` (hatcli/deploy/perf_fit.py fits the
coefficients); a block's own time is the same sum over its features (all but `frame`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hatcli.deploy.check import FALLBACK, check_graph, check_layer
from hatcli.deploy.onnx_graph import Graph, Layer
from hatcli.march_profile import FITTED_FEATURES
from hatcli.quant.march import MarchProfile

FEATURES = FITTED_FEATURES
"""Every feature, in the order of the fitted coefficient vector (the profile schema owns the names)."""

UNITS: dict[str, str] = {
    "frame": "frame", "dense_gmac": "G aligned dense MACs", "depthwise_gmac": "G aligned depthwise MACs",
    "grouped_gmac": "G aligned grouped MACs", "matmul_gmac": "G attention MACs",
    "activation_mb": "MB activations", "weight_mb": "MB weights", "elementwise_melem": "M elementwise outputs",
    "table_melem": "M table outputs", "resize_melem": "M resize outputs", "block": "BPU block",
    "cpu_melem": "M CPU elements", "cpu_block": "CPU block",
}
"""What one unit of each feature is, for tables and docs."""

TABLE_OPS = {"Sigmoid", "Tanh", "Exp", "Softmax", "HardSwish", "HardSigmoid", "Erf", "Gelu", "Log", "Sign"}
"""Ops a BPU computes through a look-up table (or, for Softmax, a table and a reduction)."""
RESIZE_OPS = {"Resize", "Upsample", "ConvTranspose"}


@dataclass
class BlockFeatures:
    """The features of one block (`frame` excluded)."""

    name: str
    op_type: str
    module: str
    fallback: bool
    values: dict[str, float] = field(default_factory=dict)
    fused: list[str] = field(default_factory=list)
    macs: int = 0


def aligned(channels: int, alignment: int) -> int:
    """`channels` rounded up to a multiple of `alignment`."""
    return -(-channels // alignment) * alignment if alignment > 1 else channels


def _conv_macs(layer: Layer, alignment: int, input_alignment: int) -> tuple[str, float]:
    """(feature, aligned MACs) of a Conv / ConvTranspose / Gemm / MatMul with weights: output
    channels rounded up to `alignment`, input channels (per group) to `input_alignment`."""
    out = layer.output_shapes[0] if layer.output_shapes else None
    w = layer.weight_shape
    if out is None or w is None or layer.macs == 0:
        return "dense_gmac", float(layer.macs)
    if layer.op_type in ("Conv", "ConvTranspose") and len(w) >= 2:
        groups = int(layer.attrs.get("group", 1))
        out_channels, in_per_group = (w[0], w[1]) if layer.op_type == "Conv" else (w[1] * groups, w[0] // groups)
        if layer.is_depthwise:
            return "depthwise_gmac", layer.macs * aligned(out_channels, alignment) / out_channels
        per_group_out = out_channels // max(groups, 1)
        ratio = ((aligned(in_per_group, input_alignment) / in_per_group)
                 * (aligned(per_group_out, alignment) / per_group_out))
        return ("grouped_gmac" if groups > 1 else "dense_gmac"), layer.macs * ratio
    # Gemm / MatMul with a weight: K x N
    k, n = w[-2], w[-1]
    if layer.op_type == "Gemm" and int(layer.attrs.get("transB", 0)):
        n, k = w[-2], w[-1]
    return "dense_gmac", layer.macs * (aligned(k, input_alignment) / k) * (aligned(n, alignment) / n)


def _elements(shapes: list[tuple[int, ...] | None]) -> int:
    return sum(math.prod(s) for s in shapes if s)


def block_features(layer: Layer, march: MarchProfile, fallback: bool, alignment: int,
                   assume: str | None = None, input_alignment: int | None = None) -> dict[str, float]:
    """The features of one non-view layer on `march` (see the module docstring)."""
    values: dict[str, float] = {}
    read, written = layer.activation_bytes(assume)
    if fallback:
        values["cpu_melem"] = (_elements(layer.input_shapes) + _elements(layer.output_shapes)) / 1e6
        values["cpu_block"] = 1.0
        return values
    values["block"] = 1.0
    values["activation_mb"] = (read + written) / 1e6
    values["weight_mb"] = layer.weight_bytes(assume) / 1e6
    out_elements = _elements(layer.output_shapes)
    if layer.macs and layer.weight_shape is not None:
        feature, macs = _conv_macs(layer, alignment, alignment if input_alignment is None else input_alignment)
        values[feature] = values.get(feature, 0.0) + macs / 1e9
    elif layer.macs:  # MatMul of two activations
        values["matmul_gmac"] = layer.macs / 1e9
    if layer.op_type in RESIZE_OPS and not layer.macs:
        values["resize_melem"] = out_elements / 1e6
    elif layer.op_type in TABLE_OPS:
        values["table_melem"] = out_elements / 1e6
    elif not layer.macs:
        values["elementwise_melem"] = out_elements / 1e6
    unfused_tables = [a for a in layer.fused if a in TABLE_OPS | {"SiLU"} and a not in march.fusible_activations]
    for act in unfused_tables:
        values["table_melem"] = values.get("table_melem", 0.0) + out_elements / 1e6
        if act == "SiLU":  # x * sigmoid(x): the table, then an elementwise multiply
            values["elementwise_melem"] = values.get("elementwise_melem", 0.0) + out_elements / 1e6
    return values


def fallback_flags(graph: Graph, march: MarchProfile) -> list[bool]:
    """Per layer of `graph`, whether `hat check` says it falls back to the CPU on `march`."""
    return [row.status == FALLBACK for row in check_graph(graph, march).rows]


def op_table_fallbacks(graph: Graph, march: MarchProfile) -> list[bool]:
    """Per layer of `graph`, whether its op or its shape puts it on the CPU on `march` (the op
    table and its limits), whatever its dtypes: what the vendor's own toolchain, which quantizes
    every op the table supports, leaves on the CPU. For graphs measured on a board after that
    toolchain, where hat's quantizer would leave an op float that the vendor's quantizes."""
    return [check_layer(layer, march, quantized_graph=False).status == FALLBACK for layer in graph.layers]


def graph_features(graph: Graph, march: MarchProfile, alignment: int = 1,
                   input_alignment: int | None = None, fallbacks: list[bool] | None = None) -> list[BlockFeatures]:
    """One BlockFeatures per non-view layer of `graph` on `march`; channels aligned to `alignment`
    (input channels to `input_alignment`, default the same). `fallbacks` (from `fallback_flags`,
    computed here when not given) says which layers run on the CPU."""
    assume = None if graph.quantized else "int8"
    flags = fallback_flags(graph, march) if fallbacks is None else fallbacks
    blocks = []
    for layer, fallback in zip(graph.layers, flags):
        if layer.is_view:
            continue
        blocks.append(BlockFeatures(layer.name, layer.op_type, layer.module, fallback,
                                    block_features(layer, march, fallback, alignment, assume, input_alignment),
                                    list(layer.fused), layer.macs))
    return blocks


def model_features(blocks: list[BlockFeatures], batch: int = 1) -> dict[str, float]:
    """The per-frame feature totals of a model (`frame` = 1), from its blocks at `batch`."""
    totals = dict.fromkeys(FEATURES, 0.0)
    for block in blocks:
        for key, value in block.values.items():
            totals[key] += value
    for key in FEATURES:
        if key not in ("block", "cpu_block"):
            totals[key] /= batch
    totals["frame"] = 1.0
    return totals
