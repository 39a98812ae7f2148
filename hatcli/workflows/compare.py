"""Do the stages agree? Run the val set through several stages' models at once and compare outputs.

`hat eval R --stage deploy --compare qat,int_infer` feeds every validation batch to each stage's
model (the QAT graph, the integer program, the compiled artifact on ONNX Runtime, ...) and
reports each stage's metrics and, for every pair:

- classification: the share of images with the same top-1 class;
- detection: the share of images whose decoded detections are the same (`same_detections`:
  as many boxes, and each matched to one of the other's with the same class at IoU >= 0.95);
- segmentation: the share of pixels with the same class (`pixel_agreement`, over the logits'
  own grid) and the difference of the two stages' mIoU (`mIoU_diff`, a minus b);
- the largest output difference over all outputs, absolute and in units of the output's
  quantization step: the integer program and the deployed artifact should agree on every image
  and differ by at most one step.

The steps come from the exported model, per output: when an output is dequantized from an
integer tensor it is that tensor's scale; when the last layer is a conv/linear on dequantized
int8 input and weights (the int32 accumulator is dequantized, as on nash_e/nash_m) it is input
scale x weight scale, per output channel.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hatcli.engine.loaders import build_loader
from hatcli.errors import UsageError
from hatcli.progress import make_progress
from hatcli.stages import default_export_dir
from hatcli.workflows.stage_models import stage_model

AGREEMENT_KEY = {"classification": "top1_agreement", "detection": "same_detections",
                 "segmentation": "pixel_agreement"}
"""The name of a pair's agreement figure, by task kind."""
SAME_BOX_IOU = 0.95
"""Two detections are the same when their classes are equal and their boxes overlap this much."""


def output_steps(onnx_path: Path) -> list[np.ndarray | None]:
    """Quantization step of each model output (per output channel), None for a float output."""
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

    def step(name: str) -> np.ndarray | None:
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear":
            return dq_scale(name)
        if node.op_type in ("Gemm", "MatMul", "Conv"):
            sx, sw = dq_scale(node.input[0]), dq_scale(node.input[1])
            if sx is not None and sw is not None:
                return (sx * sw).reshape(-1)
        return None

    return [step(output.name) for output in graph.output]


def flat_outputs(outputs: Any) -> list[torch.Tensor]:
    """A stage's outputs as a list of float tensors (one tensor, or a tuple/list of them)."""
    items = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    return [torch.as_tensor(item).float() for item in items]


def broadcast_step(step: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A per-channel step shaped to divide an output: channels are the last dim of a [N, C]
    output and dim 1 of an [N, C, H, W] one; a single step divides everything."""
    values = torch.from_numpy(np.asarray(step, dtype=np.float64).reshape(-1))
    if values.numel() == 1:
        return values.reshape(())
    if like.dim() <= 2:
        return values
    return values.reshape(1, -1, *([1] * (like.dim() - 2)))


def top_classes(task_kind: str, logits: torch.Tensor) -> torch.Tensor:
    """The most likely class of each unit of a batch of logits: per image ([N, C] -> [N]) for
    classification, per pixel ([N, C, H, W] -> [N, H, W]) for segmentation."""
    return logits.argmax(1 if task_kind == "segmentation" else -1)


def same_detections(a: Any, b: Any, iou: float = SAME_BOX_IOU) -> bool:
    """Whether two images' `Detections` are the same: equal counts, and a one-to-one matching in
    which every pair has the same class and boxes overlapping at least `iou`."""
    from torchvision.ops import box_iou

    if len(a) != len(b):
        return False
    if len(a) == 0:
        return True
    overlap = box_iou(a.boxes.double(), b.boxes.double())
    overlap[a.labels.reshape(-1, 1) != b.labels.reshape(1, -1)] = 0
    taken = torch.zeros(len(b), dtype=torch.bool)
    for i in torch.argsort(a.scores, descending=True).tolist():
        row = overlap[i].masked_fill(taken, -1)
        j = int(row.argmax())
        if row[j] < iou:
            return False
        taken[j] = True
    return True


class _Pair:
    """Running agreement of two stages."""

    def __init__(self, a: str, b: str) -> None:
        self.a, self.b = a, b
        self.same = 0
        self.count = 0
        self.images = 0
        self.max_abs = 0.0
        self.max_steps = 0.0

    def update_outputs(self, xs: list[torch.Tensor], ys: list[torch.Tensor], steps: list[np.ndarray | None]) -> None:
        """Fold one batch's largest output differences in."""
        for index, (x, y) in enumerate(zip(xs, ys)):
            diff = (x.double() - y.double()).abs()
            if diff.numel() == 0:
                continue
            self.max_abs = max(self.max_abs, float(diff.max()))
            step = steps[index] if index < len(steps) else None
            if step is not None:
                self.max_steps = max(self.max_steps, float((diff / broadcast_step(step, diff)).max()))

    def update_same(self, same: int, count: int, images: int) -> None:
        """Count the units (images, or pixels) of one batch of `images` on which the two stages agree."""
        self.same += same
        self.count += count
        self.images += images

    def result(self, agreement_key: str, with_steps: bool) -> dict[str, Any]:
        """The pair's row of the report."""
        out: dict[str, Any] = {"a": self.a, "b": self.b, "images": self.images,
                               agreement_key: 100.0 * self.same / max(1, self.count), "max_abs_diff": self.max_abs}
        if with_steps:
            out["max_diff_steps"] = self.max_steps
        return out


def compare_stages(lr: Any, stages: list[str], artifact: Path | None = None,
                   runtime: str | None = None) -> dict[str, Any]:
    """Metrics of each stage and pairwise agreement over the val set (see the module docstring);
    the deploy stage runs on the registered runtime `runtime` (default ONNX Runtime)."""
    if len(set(stages)) != len(stages):
        raise UsageError(f"--compare names a stage twice: {', '.join(stages)}")
    models = {stage: stage_model(lr, stage, *((artifact, runtime) if stage == "deploy" else (None, None)))[0]
              for stage in stages}
    report = compare_models(lr, models, list(itertools.combinations(stages, 2)))
    return {"stages": report["stages"], **({"runtime": runtime or "onnxruntime"} if "deploy" in stages else {}),
            "agreement": report["agreement"], "output_step": report["output_step"]}


def compare_models(lr: Any, models: dict[str, Callable[[torch.Tensor], Any]], pairs: list[tuple[str, str]],
                   limit: int | None = None) -> dict[str, Any]:
    """Run the val set (its first `limit` images, default all) through every model of `models` (name ->
    batch -> outputs in the deploy model's order) at once: each model's metrics, and the agreement
    of each pair of names in `pairs`, in steps of the exported model's outputs where it is there."""
    task_kind = lr.family.task
    export = default_export_dir(lr) / "model.onnx"
    steps = output_steps(export) if export.exists() else []
    with_steps = any(step is not None for step in steps)
    loader = build_loader(lr, "val")
    metrics = {name: lr.family.build_metric(loader.dataset, lr.model) for name in models}
    running = [_Pair(a, b) for a, b in pairs]
    total = len(loader) if limit is None else min(len(loader), -(-limit // lr.recipe.data.batch_size))
    seen = 0
    with torch.no_grad(), make_progress() as progress:
        task = progress.add_task(f"compare {', '.join(models)}", total=total)
        for images, targets in loader:
            if limit is not None and seen >= limit:
                break
            if limit is not None and seen + len(images) > limit:
                images, targets = images[:limit - seen], targets[:limit - seen]
            seen += len(images)
            raw = {name: model(images) for name, model in models.items()}
            flat = {name: flat_outputs(out) for name, out in raw.items()}
            for name, out in raw.items():
                metrics[name].update(out, targets)
            if task_kind == "detection":
                decoded = {name: lr.family.predict(out, config=lr.model) for name, out in raw.items()}
            for pair in running:
                pair.update_outputs(flat[pair.a], flat[pair.b], steps)
                if task_kind == "detection":
                    same = [same_detections(x, y) for x, y in zip(decoded[pair.a], decoded[pair.b])]
                    pair.update_same(sum(same), len(same), len(images))
                else:
                    same_class = top_classes(task_kind, flat[pair.a][0]) == top_classes(task_kind, flat[pair.b][0])
                    pair.update_same(int(same_class.sum()), same_class.numel(), len(images))
            progress.advance(task)
    known = [np.asarray(step).reshape(-1) for step in steps if step is not None]
    scores = {name: metric.compute() for name, metric in metrics.items()}
    rows = [pair.result(AGREEMENT_KEY[task_kind], with_steps) for pair in running]
    if task_kind == "segmentation":
        for row in rows:
            row["mIoU_diff"] = scores[row["a"]]["mIoU"] - scores[row["b"]]["mIoU"]
    return {
        "stages": scores,
        "images": seen,
        "agreement": rows,
        "output_step": None if not known else {"min": float(min(s.min() for s in known)),
                                               "max": float(max(s.max() for s in known))},
    }
