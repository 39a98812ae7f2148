"""Do the stages agree? Run the val set through several stages' models at once and compare outputs.

`hat eval R --stage deploy --compare qat,int_infer` feeds every validation batch to each stage's
model (the QAT graph, the integer program, the compiled artifact on ONNX Runtime, ...) and
reports, for every pair, the share of images with the same top-1 class and the largest output
difference, also in units of the output's quantization step: the integer program and the
deployed artifact should agree on every top-1 and differ by at most one step.

The step comes from the exported model: when the output is dequantized from an integer tensor it
is that tensor's scale; when the last layer is a conv/linear on dequantized int8 input and weights
(the int32 accumulator is dequantized, as on nash_e/nash_m) it is input scale x weight scale, per
output channel.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hatcli.errors import UsageError


def output_step(onnx_path: Path) -> np.ndarray | None:
    """Quantization step of the model's first output (per output channel), or None if it is float."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def dq_scale(name: str) -> np.ndarray | None:
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits:
            return None
        return np.asarray(inits[node.input[1]], dtype=np.float64)

    node = producers.get(graph.output[0].name)
    if node is None:
        return None
    if node.op_type == "DequantizeLinear":
        return dq_scale(graph.output[0].name)
    if node.op_type in ("Gemm", "MatMul", "Conv"):
        sx, sw = dq_scale(node.input[0]), dq_scale(node.input[1])
        if sx is not None and sw is not None:
            return (sx * sw).reshape(-1)
    return None


class _Pair:
    def __init__(self, a: str, b: str) -> None:
        self.a, self.b = a, b
        self.same = 0
        self.count = 0
        self.max_abs = 0.0
        self.max_steps = 0.0

    def update(self, x: torch.Tensor, y: torch.Tensor, step: torch.Tensor | None) -> None:
        self.same += int((x.argmax(-1) == y.argmax(-1)).sum())
        self.count += x.shape[0]
        diff = (x.double() - y.double()).abs()
        self.max_abs = max(self.max_abs, float(diff.max()))
        if step is not None:
            self.max_steps = max(self.max_steps, float((diff / step).max()))

    def result(self, with_steps: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"a": self.a, "b": self.b, "images": self.count,
                               "top1_agreement": 100.0 * self.same / max(1, self.count),
                               "max_abs_diff": self.max_abs}
        if with_steps:
            out["max_diff_steps"] = self.max_steps
        return out


def compare_stages(lr: Any, stages: list[str], artifact: Path | None = None) -> dict[str, Any]:
    """Metrics of each stage and pairwise agreement over the val set (see the module docstring)."""
    from hatcli.engine.loaders import build_loader
    from hatcli.engine.stages import default_export_dir, stage_model
    from hatcli.metrics.classification import TopKAccuracy
    from hatcli.progress import make_progress

    if len(set(stages)) != len(stages):
        raise UsageError(f"--compare names a stage twice: {', '.join(stages)}")
    if lr.family.task != "classification":
        raise UsageError(f"--compare is available for classification models, not {lr.family.task}")
    models = {stage: stage_model(lr, stage, artifact if stage == "deploy" else None)[0] for stage in stages}
    export = default_export_dir(lr) / "model.onnx"
    step_array = output_step(export) if export.exists() else None
    step = torch.from_numpy(step_array) if step_array is not None else None
    metrics = {stage: TopKAccuracy() for stage in stages}
    pairs = [_Pair(a, b) for a, b in itertools.combinations(stages, 2)]
    loader = build_loader(lr, "val")
    with torch.no_grad(), make_progress() as progress:
        task = progress.add_task(f"compare {', '.join(stages)}", total=len(loader))
        for images, labels in loader:
            outputs = {stage: torch.as_tensor(model(images)).float() for stage, model in models.items()}
            for stage, out in outputs.items():
                metrics[stage].update(out, labels)
            for pair in pairs:
                pair.update(outputs[pair.a], outputs[pair.b], step)
            progress.advance(task)
    return {
        "stages": {stage: metric.compute() for stage, metric in metrics.items()},
        "agreement": [pair.result(step is not None) for pair in pairs],
        "output_step": None if step_array is None else {"min": float(step_array.min()), "max": float(step_array.max())},
    }
