"""One layer taken from the quantized model, every other layer float: a layer's *own* error.

The quantized graph (QAT, or calibration) is copied once. For the layer under test its weights
and its fake quants (weight, output, the graph input's when it reads the input) are those of the
quantized model; every other layer gets the float model's weights (BatchNorm folded, as in every
stage) and runs with its fake quants off. The layer then reads float inputs, so what differs from
the float model, at its own output and at the model's outputs, is this layer alone: the error it
makes, not one it inherits. When the quantized stage is the calibration, whose weights are the
float ones, this is what `hat sensitivity` measures; with the quantized graph's own weights for
the other layers too, it measures quantization alone (what the QAT model loses to it).
"""

from __future__ import annotations

import copy
import torch
from torch.fx import GraphModule

from hatcli.quant import flow
from hatcli.quant.layer_graph import LayerGraph, graph_attribute
from hatcli.quant.sensitivity import QuantLayer, enable_only
from hatcli.workflows.debug_capture import Captured, GraphCapture


class LayerAlone:
    """The quantized graph with one layer quantized at a time (see the module docstring).

    `float_graph` gives every other layer's weights: the float model's, or (to leave out what QAT
    changed in the weights) the quantized graph itself, whose float computation `reference` runs."""

    def __init__(self, quant_graph: GraphModule, float_graph: GraphModule, graph: LayerGraph) -> None:
        self.gm = copy.deepcopy(quant_graph)
        flow.set_mode(self.gm, "eval")
        self.graph = LayerGraph(self.gm, graph.layers)
        targets = {t for layer in graph.layers for t in self.graph.parameter_targets(layer)}
        self.quant = {t: graph_attribute(quant_graph, t).detach().clone() for t in targets}
        self.float = {t: graph_attribute(float_graph, t).detach().clone() for t in targets}
        self._load(self.float)
        self.grids = {layer.name: graph.output_grid(layer) for layer in graph.layers}

    def _load(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for target, value in values.items():
                graph_attribute(self.gm, target).copy_(value)

    def reference(self, images: torch.Tensor) -> Captured:
        """The model's outputs and every layer's output with no layer quantized (the reference weights)."""
        enable_only(self.gm, [])
        nodes = {layer.name: self.graph.output_node(layer).name for layer in self.graph.layers}
        return GraphCapture(self.gm, nodes, {})(images)

    def weights_differ(self, layer: QuantLayer) -> bool:
        """Whether the quantized model's weights of `layer` are not the float model's (QAT moved them)."""
        return any(not torch.equal(self.quant[t], self.float[t]) for t in self.graph.parameter_targets(layer))

    def run(self, layer: QuantLayer, images: torch.Tensor, quantized: bool = True) -> Captured:
        """The model's outputs and `layer`'s output with only `layer` taken from the quantized
        model: its weights and fake quants, or (`quantized=False`) its weights alone."""
        own = {t: self.quant[t] for t in self.graph.parameter_targets(layer)}
        self._load(own)
        enable_only(self.gm, layer.modules if quantized else [])
        try:
            capture = GraphCapture(self.gm, {layer.name: self.graph.output_node(layer).name},
                                   {layer.name: self.grids[layer.name]})
            return capture(images)
        finally:
            self._load({t: self.float[t] for t in own})
