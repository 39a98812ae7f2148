"""The measuring pass of `hat debug`: the same images through every stage and through every
layer taken alone from the quantized model, with each layer's output compared as it goes.

Per batch, every stage runs once while its layers' outputs are kept (`hatcli.workflows.debug_capture`);
each stage is compared with float, and the chosen pair and the stages that must agree (the
quantized graph with the integer program, the integer program with the artifact) with each
other, layer by layer and at the outputs. Then each layer is run alone (`hatcli.workflows.debug_local`)
and compared with float at its own output and at the model's outputs (a layer whose weights QAT
moved also with its weights alone, unquantized, to tell the two apart); when the pair starts from
another stage than float (the default `qat_float,int_infer` of a QAT run, or `--pair qat,int_infer`)
every other layer keeps the quantized graph's weights and the reference is that graph computed in
float (qat_float), so only quantization is measured. The float values of every layer (qat_float's
in a QAT run: the activations the QAT grids were trained for) are checked against its output grid
(`RangeStats`). Only one batch of layer outputs is held at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from hatcli.data.datasets import collate_for
from hatcli.engine.loaders import DeviceLoader, build_dataset
from hatcli.inputs import batch_transform
from hatcli.progress import make_progress
from hatcli.recipe import LoadedRecipe
from hatcli.workflows.compare import flat_outputs, same_detections, top_classes
from hatcli.workflows.debug_capture import same_outputs
from hatcli.workflows.debug_local import LayerAlone
from hatcli.workflows.debug_metrics import Agreement, OutputsAgreement, RangeStats, grid_step, image_differences
from hatcli.workflows.debug_stages import QAT_FLOAT, DebugModels

INTEGER_STAGES = ("int_infer", "deploy")
"""Stages that compute in integers: they must agree with each other exactly (or within a step)."""


def consistency_pairs(stages: list[str], quant_stage: str) -> list[tuple[str, str]]:
    """The pairs of stages that should compute (nearly) the same thing: the quantized graph and
    the integer program converted from it, the integer program and the compiled artifact."""
    pairs = [(quant_stage, "int_infer"), ("int_infer", "deploy")]
    return [(a, b) for a, b in pairs if a in stages and b in stages]


def image_indices(count: int, available: int) -> list[int]:
    """`count` indices spread evenly over a val set of `available` images (all of them when fewer)."""
    count = min(count, available)
    return [int(i * available / count) for i in range(count)] if count else []


def val_batches(lr: LoadedRecipe, indices: list[int]) -> DeviceLoader:
    """Batches of the val images `indices`, with the recipe's val and batch transforms."""
    dataset = build_dataset(lr, "val")
    collate = collate_for(getattr(dataset, "kind", ""))
    loader = DataLoader(Subset(dataset, indices), batch_size=lr.recipe.data.batch_size, shuffle=False,
                        collate_fn=collate)
    return DeviceLoader(loader, batch_transform(lr), "cpu")


@dataclass
class ImageRecord:
    """How one image fared between the pair of stages."""

    index: int
    """Index in the packed val set."""
    sqnr_db: float
    difference: float
    """Root mean square of the difference of the pair's outputs on this image."""
    same: bool | float
    """How much of the prediction the pair agree on: whether the top-1 class or the detections
    are the same, or the share of pixels with the same class (segmentation)."""


@dataclass
class Measurements:
    """Everything the measuring pass folded in (see the module docstring)."""

    stages: list[str]
    pair: tuple[str, str]
    images: int = 0
    layers: dict[tuple[str, str], dict[str, Agreement]] = field(default_factory=dict)
    """(stage a, stage b) -> layer -> agreement of b's output with a's."""
    outputs: dict[tuple[str, str], OutputsAgreement] = field(default_factory=dict)
    alone_layer: dict[str, Agreement] = field(default_factory=dict)
    """Layer -> its output, taken alone from the quantized model, against float (or, when the
    pair starts from a quantized stage, against the quantized graph computed in float)."""
    alone_outputs: dict[str, OutputsAgreement] = field(default_factory=dict)
    weights_outputs: dict[str, OutputsAgreement] = field(default_factory=dict)
    """Layer -> the outputs with only its weights taken from the quantized model, unquantized
    (for the layers whose weights QAT moved)."""
    ranges: dict[str, RangeStats] = field(default_factory=dict)
    per_image: list[ImageRecord] = field(default_factory=list)
    same_as_float: dict[str, float] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)
    """Classification: images each stage classified right."""
    capture_exact: dict[str, bool] = field(default_factory=dict)
    """Whether capturing left each stage's outputs exactly as its ordinary run's (first batch)."""


def _predictions(lr: LoadedRecipe, captured: dict[str, Any]) -> dict[str, Any]:
    """Each stage's prediction on the batch: its decoded detections, its top-1 classes, or (segmentation)
    every pixel's class on the logits' grid."""
    if lr.family.task == "detection":
        return {stage: lr.family.predict(out, config=lr.model) for stage, (out, _) in captured.items()}
    return {stage: top_classes(lr.family.task, flat_outputs(out)[0]) for stage, (out, _) in captured.items()}


def _same(a: Any, b: Any) -> list[bool] | list[float]:
    """Per image, how much of two stages' predictions (`_predictions`) agree: whether the class or
    the detections are the same, or the share of equal pixels of a segmentation map."""
    if isinstance(a, torch.Tensor) and a.dim() > 1:
        return (a == b).reshape(len(a), -1).double().mean(1).tolist()
    if isinstance(a, torch.Tensor):
        return (a == b).tolist()
    return [same_detections(x, y) for x, y in zip(a, b)]


def _compare_layers(into: dict[str, Agreement], reference: dict[str, torch.Tensor], test: dict[str, torch.Tensor],
                    steps: dict[str, Any]) -> None:
    for name, value in test.items():
        if name in reference:
            into.setdefault(name, Agreement()).update(reference[name], value, steps.get(name, lambda _: None)(value))


def measure(lr: LoadedRecipe, models: DebugModels, pair: tuple[str, str], indices: list[int],
            local: bool = True) -> Measurements:
    """Run the measuring pass over the val images `indices` (see the module docstring)."""
    stages = list(models.stages)
    result = Measurements(stages=stages, pair=pair)
    pairs = list(dict.fromkeys([*(("float", s) for s in stages if s != "float"), pair,
                                *consistency_pairs(stages, models.quant_stage)]))
    graph = models.graph
    grids = {layer.name: graph.output_grid(layer) for layer in models.layers}
    accumulators = {layer.name: graph.accumulator_step(layer) for layer in models.layers}
    steps = {name: (lambda like, g=grids[name], a=accumulators[name]: grid_step(g, like, a)) for name in grids}
    # against float, a layer alone carries its weights too; against a quantized stage, only its quantization
    against_float = pair[0] == "float"
    weights = models.float_graph if against_float else models.quant_graph
    # the float values each layer's grid is judged against: the quantized model's own weights in float
    range_source = QAT_FLOAT if QAT_FLOAT in stages and models.quant_stage == "qat" else "float"
    alone = LayerAlone(models.quant_graph, weights, graph) if local else None
    batches = val_batches(lr, indices)
    work = len(batches) * (len(stages) + (len(models.layers) if local else 0))
    position = 0
    with torch.no_grad(), make_progress() as progress:
        task = progress.add_task(f"debug {lr.recipe.task}: {len(stages)} stages, {len(models.layers)} layers",
                                 total=work)
        for batch_number, (images, targets) in enumerate(batches):
            captured = {}
            for stage, model in models.stages.items():
                captured[stage] = model.capture(images)
                if batch_number == 0:
                    result.capture_exact[stage] = same_outputs(captured[stage][0], model.model(images))
                progress.advance(task)
            predictions = _predictions(lr, captured)
            _fold_stages(result, captured, predictions, pairs, steps, targets)
            for name, values in captured[range_source][1].items():
                result.ranges.setdefault(name, RangeStats()).update(values, grids.get(name))
            flat_a, flat_b = (flat_outputs(captured[stage][0]) for stage in pair)
            for index, (sqnr, difference), same in zip(indices[position:], image_differences(flat_a, flat_b),
                                                        _same(predictions[pair[0]], predictions[pair[1]])):
                result.per_image.append(ImageRecord(index, sqnr, difference, same))
            position += int(images.shape[0])
            if alone is not None:
                reference = captured[pair[0]] if pair[0] in ("float", QAT_FLOAT) else alone.reference(images)
                for layer in models.layers:
                    _fold_alone(result, alone, layer, images, reference, steps)
                    progress.advance(task)
    result.images = position
    return result


def _fold_alone(result: Measurements, alone: LayerAlone, layer: Any, images: torch.Tensor,
                reference: tuple[Any, dict[str, torch.Tensor]], steps: dict[str, Any]) -> None:
    """Run one layer alone on one batch and compare it with `reference` (outputs, layer values)."""
    reference_outputs = flat_outputs(reference[0])
    outputs, values = alone.run(layer, images)
    _compare_layers(result.alone_layer, reference[1], values, steps)
    result.alone_outputs.setdefault(layer.name, OutputsAgreement()).update(reference_outputs, flat_outputs(outputs))
    if alone.weights_differ(layer):
        outputs, _ = alone.run(layer, images, quantized=False)
        result.weights_outputs.setdefault(layer.name, OutputsAgreement()).update(
            reference_outputs, flat_outputs(outputs))


def _fold_stages(result: Measurements, captured: dict[str, Any], predictions: dict[str, Any],
                 pairs: list[tuple[str, str]], steps: dict[str, Any], targets: Any) -> None:
    """Compare one batch of every stage: layer by layer and at the outputs for each pair, and
    each stage's predictions with float's (and, for classification, with the labels)."""
    flat = {stage: flat_outputs(out) for stage, (out, _) in captured.items()}
    for a, b in pairs:
        _compare_layers(result.layers.setdefault((a, b), {}), captured[a][1], captured[b][1], steps)
        result.outputs.setdefault((a, b), OutputsAgreement()).update(flat[a], flat[b])
    for stage, predicted in predictions.items():
        result.same_as_float[stage] = result.same_as_float.get(stage, 0) + sum(_same(predictions["float"], predicted))
        if isinstance(predicted, torch.Tensor) and isinstance(targets, torch.Tensor):
            result.correct[stage] = result.correct.get(stage, 0) + int((predicted == targets.reshape(-1)).sum())
