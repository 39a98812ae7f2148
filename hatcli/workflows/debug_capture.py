"""Running a stage's model on a batch while keeping every layer's output, as float values.

A torch stage (a prepared graph, the integer program) runs node by node through an fx
`Interpreter`, which calls exactly the ops and modules the graph's own forward calls, and keeps
the values of the layers' output nodes; integer codes are dequantized with the layer's grid. The
compiled artifact runs in ONNX Runtime on a copy of its model whose layer tensors are graph
outputs too (`hatcli.deploy.layer_tensors`). Either way the model's outputs must be what the
ordinary run returns, bit for bit; `same_outputs` checks it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.utils import _pytree as pytree

from hatcli.deploy.layer_tensors import CaptureSession, LayerTensor, dequantize
from hatcli.quant.layer_graph import OutputGrid
from hatcli.workflows.compare import flat_outputs

Captured = tuple[Any, dict[str, torch.Tensor]]
"""A stage's outputs (as its ordinary run returns them) and each layer's output as float values."""


class _Recorder(Interpreter):
    """An fx Interpreter that keeps the values of the nodes it is asked for."""

    def __init__(self, gm: GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, Any] = {}

    def run_node(self, n: Node) -> Any:
        """Run one node as the graph's forward would, keeping its value when it is wanted."""
        value = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = value
        return value


def _as_float(value: torch.Tensor, grid: OutputGrid | None) -> torch.Tensor:
    """A captured tensor as float values: integer codes are dequantized on the layer's grid."""
    if value.is_floating_point() or grid is None:
        return value.detach().float()
    return ((value.to(torch.float64) - grid.zero_point) * grid.scale).float()


class GraphCapture:
    """A torch stage's graph, run while keeping the outputs of its layers' nodes."""

    def __init__(self, gm: GraphModule, nodes: dict[str, str], grids: dict[str, OutputGrid | None]) -> None:
        self.gm = gm
        self.nodes = nodes
        """Layer name -> the graph node holding its output."""
        self.grids = grids

    def __call__(self, images: torch.Tensor) -> Captured:
        """The stage's outputs for `images` and each layer's output (float)."""
        recorder = _Recorder(self.gm, set(self.nodes.values()))
        with torch.no_grad():
            result = recorder.run(images)
        spec = getattr(self.gm, "_out_spec", None)
        if spec is not None:
            result = pytree.tree_unflatten(list(pytree.tree_leaves(result)), spec)
        layers = {name: _as_float(recorder.values[node], self.grids.get(name)) for name, node in self.nodes.items()
                  if isinstance(recorder.values.get(node), torch.Tensor)}
        return result, layers


class ArtifactCapture:
    """The compiled artifact in ONNX Runtime, returning its layers' tensors beside its outputs."""

    def __init__(self, session: CaptureSession, tensors: dict[str, LayerTensor]) -> None:
        self.session = session
        self.tensors = {name: ref for name, ref in tensors.items() if ref.tensor in session.names
                        or ref.tensor in session.model_outputs}

    def __call__(self, images: torch.Tensor) -> Captured:
        """The artifact's outputs for `images` (a tensor, or a tuple of them) and each layer's output."""
        outputs, values = self.session.run(images.detach().cpu().numpy())
        by_name = {**values, **dict(zip(self.session.model_outputs, outputs))}
        layers = {name: torch.from_numpy(dequantize(by_name[ref.tensor], ref, self.session.dtypes[ref.tensor]))
                  for name, ref in self.tensors.items()}
        result = [torch.from_numpy(np.asarray(out)) for out in outputs]
        return (result[0] if len(result) == 1 else tuple(result)), layers


def same_outputs(captured: Any, plain: Any) -> bool:
    """Whether the outputs of a capturing run are exactly (bit for bit) those of the ordinary run."""
    ours, theirs = flat_outputs(captured), flat_outputs(plain)
    return len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
