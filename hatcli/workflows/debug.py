"""`hat debug RECIPE`: which layer lost the accuracy, written to `runs/<task>/debug/debug.json`.

The same val images go through every stage of the run (float, calibration, qat, int_infer and
the compiled artifact) and through each layer taken alone from the quantized model
(`hatcli.workflows.debug_measure`); the layers are matched across stages by the module path
they came from. The findings (`hatcli.workflows.debug_findings`): the first layer where the
chosen pair of stages diverges, the layers whose own error costs the outputs most, what is wrong
with each (ranges against grids, weights, biases, low-bit schemes) and the rule of the recipe
that quantized it (`hatcli.workflows.debug_quant`), advice (`hatcli.workflows.debug_advice`)
and the images the pair disagrees on most, drawn with every stage's prediction
(`hatcli.workflows.debug_worst`). Every top-level key of the file is a list of flat objects (a
table), an object or a string, the most important first, as `hat report` shows them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hatcli.atomic import atomic_write_text
from hatcli.engine.loaders import build_dataset
from hatcli.errors import UsageError
from hatcli.quant.bias_saturation import saturated_biases
from hatcli.quant.layer_graph import LayerGraph
from hatcli.quant.march import load_march
from hatcli.quant.quantizer import module_path
from hatcli.recipe import LoadedRecipe
from hatcli.workflows.debug_advice import advice
from hatcli.workflows.debug_findings import (
    Thresholds,
    first_divergence,
    layer_diagnoses,
    layer_rows,
    over_steps,
    range_diagnosis,
    rank_causes,
)
from hatcli.workflows.debug_measure import Measurements, consistency_pairs, image_indices, measure
from hatcli.workflows.debug_metrics import rounded
from hatcli.workflows.debug_quant import applied_quantization, weight_findings
from hatcli.workflows.debug_stages import DebugModels, build_models, choose_stages, default_pair
from hatcli.workflows.debug_worst import draw_worst, rank_images

DEFAULT_IMAGES = 64
DEFAULT_WORST = 4
SECTIONS = ("verdict", "summary", "first_divergence", "causes", "advice", "stages", "layers", "worst_inputs", "ranges",
            "weights", "quantization", "consistency")
"""The keys of debug.json, in the order they are written (and shown)."""


def debug_dir(lr: LoadedRecipe) -> Path:
    """Where `hat debug` writes: `runs/<task>/debug/`."""
    return lr.run_dir / "debug"


@dataclass
class DebugResult:
    """What `debug_run` found and where it wrote it."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)


def debug_run(lr: LoadedRecipe, stages: list[str] | None = None, pair: tuple[str, str] | None = None,
              images: int = DEFAULT_IMAGES, worst: int = DEFAULT_WORST,
              thresholds: Thresholds = Thresholds()) -> DebugResult:
    """Debug `lr`'s run on `images` val images (see the module docstring) and write debug.json.

    `stages` (default every stage the run has) are compared with float, `pair` (default
    `default_pair`: quantization alone) with each other. UsageError for a stage the run lacks
    (naming the command that makes it) or bad options."""
    started = time.perf_counter()
    pair = pair or default_pair(lr)
    if images < 1 or worst < 0:
        raise UsageError(f"--images must be at least 1 and --worst at least 0 (got {images}, {worst})")
    chosen = choose_stages(lr, stages, pair)
    models = build_models(lr, chosen)
    available = len(build_dataset(lr, "val"))
    measured = measure(lr, models, pair, image_indices(images, available))
    folder = debug_dir(lr)
    data = findings(lr, models, measured, thresholds)
    drawn = {stage: models.stages[stage].model for stage in chosen}
    data["worst_inputs"] = draw_worst(lr, drawn, models.classes, rank_images(measured.per_image, worst), folder)
    data["summary"]["seconds"] = round(time.perf_counter() - started, 1)
    ordered = {key: data[key] for key in SECTIONS if key in data}
    path = folder / "debug.json"
    # not sorted: the most important sections first, as `hat report` shows them
    atomic_write_text(path, json.dumps(ordered, indent=2, allow_nan=False, default=str) + "\n")
    return DebugResult(path, ordered)


def findings(lr: LoadedRecipe, models: DebugModels, measured: Measurements, thresholds: Thresholds) -> dict[str, Any]:
    """Every section of debug.json but the drawings, from the measurements."""
    march = load_march(lr.recipe.quant.march)
    graph = models.graph
    rows = layer_rows(graph, measured, thresholds)
    quantization = applied_quantization(lr, march, graph)
    saturation = saturated_biases(models.quant_graph, lambda node: module_path(node) or node.name)
    weights = weight_findings(graph, LayerGraph(models.float_graph, models.layers), saturation)
    diagnoses = layer_diagnoses(graph, rows, measured, weights, quantization)
    divergence = first_divergence(rows, measured.pair, thresholds, diagnoses, quantization)
    causes = rank_causes(rows, diagnoses, quantization)
    int16_keys = {layer.name: layer.int16_key for layer in models.layers}
    found_advice = advice(lr, march, causes, divergence, int16_keys, thresholds, measured.pair)
    stages = stage_rows(models, measured)
    return {
        "verdict": verdict(measured, divergence, causes, found_advice, stages),
        "summary": summary(lr, models, measured, thresholds, divergence, causes),
        "first_divergence": divergence,
        "causes": causes,
        "advice": found_advice,
        "stages": stages,
        "layers": rows,
        "ranges": range_rows(graph, measured),
        "weights": weights,
        "quantization": quantization,
        "consistency": consistency_rows(models, measured),
    }


def verdict(measured: Measurements, divergence: dict[str, Any], causes: list[dict[str, Any]],
            found_advice: list[dict[str, str]], stages: list[dict[str, Any]]) -> dict[str, Any]:
    """The answer in a few lines: which layer loses the most, how the pair agrees, what to do.

    The layer is the first divergence when its error is its own, else the largest own error (the
    first divergence then inherits from upstream)."""
    a, b = measured.pair
    own = divergence.get("layer") and divergence.get("inherited") is not True
    top = divergence if own else (causes[0] if causes else {})
    layer = top.get("layer")
    if not layer:
        finding = "no layer: the model has no quantized layer to compare"
    else:
        why = (f"the first layer where {a} and {b} part ({divergence.get('sqnr_db')} dB SQNR there), and its own "
               f"error" if own else "the largest own error of any layer")
        finding = (f"{layer} ({top.get('op')}, {top.get('dtype')}): {why}; quantized alone (every other layer "
                   f"float) it leaves the model's outputs at {top.get('alone_output_sqnr_db')} dB SQNR")
    accuracy = {row["stage"]: row.get("top1_pct") for row in stages}
    outputs = measured.outputs.get((a, b))
    agreement = (f"{b} against {a} on {measured.images} images: "
                 f"{_pct(sum(r.same for r in measured.per_image), len(measured.per_image))} % same prediction, "
                 f"outputs at {rounded(outputs.sqnr_db, 2) if outputs else '-'} dB SQNR")
    if accuracy.get(a) is not None and accuracy.get(b) is not None:
        agreement += f"; top-1 {accuracy[a]} % ({a}) and {accuracy[b]} % ({b}) on these images"
    first = next((item for item in found_advice if item["layer"] == layer), found_advice[0] if found_advice else {})
    return {"layer": layer or "-", "finding": finding, "agreement": agreement,
            "do": first.get("do", "-"), "how": first.get("how", "-"),
            "first_divergence": divergence.get("layer") or "none"}


def summary(lr: LoadedRecipe, models: DebugModels, measured: Measurements, thresholds: Thresholds,
            divergence: dict[str, Any], causes: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline: what was compared on how many images, and what was found."""
    a, b = measured.pair
    exact = [s for s, ok in measured.capture_exact.items() if not ok]
    return {"recipe": str(lr.path), "task": lr.recipe.task, "family": lr.family.name, "kind": lr.family.task,
            "march": lr.recipe.quant.march, "quantized_stage": models.quant_stage,
            "stages": ", ".join(measured.stages), "pair": f"{a} vs {b}", "images": measured.images,
            "layers": len(models.layers), "thresholds": thresholds.describe(),
            "sqnr_threshold_db": thresholds.sqnr_db,
            "first_divergence": divergence.get("layer") or "none",
            "top_cause": causes[0]["layer"] if causes else "none",
            "output_sqnr_db": rounded(measured.outputs[(a, b)].sqnr_db, 2) if (a, b) in measured.outputs else None,
            "same_prediction_pct": _pct(sum(r.same for r in measured.per_image), len(measured.per_image)),
            "capture_exact": "every stage" if not exact else f"NOT for {', '.join(exact)}"}


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


def stage_rows(models: DebugModels, measured: Measurements) -> list[dict[str, Any]]:
    """One row per stage: agreement with float on these images, and how many layers were read."""
    rows = []
    for stage, model in models.stages.items():
        outputs = measured.outputs.get(("float", stage))
        row: dict[str, Any] = {"stage": stage, "same_as_float_pct": _pct(measured.same_as_float.get(stage, 0),
                                                                        measured.images)}
        if stage in measured.correct:
            row["top1_pct"] = _pct(measured.correct[stage], measured.images)
        row.update(output_sqnr_db=rounded(outputs.sqnr_db, 2) if outputs else None,
                   layers_read=f"{model.layers_found} of {len(models.layers)}",
                   capture_exact=measured.capture_exact.get(stage), note=model.note or "-")
        rows.append(row)
    return rows


def range_rows(graph: LayerGraph, measured: Measurements) -> list[dict[str, Any]]:
    """Per quantized layer: the calibrated range, the grid, the float range on these images, the
    share the grid clips, and the diagnosis."""
    rows = []
    for layer in graph.layers:
        grid, stats = graph.output_grid(layer), measured.ranges.get(layer.name)
        if grid is None or stats is None or not stats.count:
            continue
        calibrated = graph.calibrated_range(layer)
        rows.append({"layer": layer.name, "dtype": layer.dtype,
                     "calibrated": "-" if calibrated is None else f"[{calibrated[0]:.4g}, {calibrated[1]:.4g}]",
                     "grid": f"[{grid.low:.4g}, {grid.high:.4g}]", "seen": f"[{stats.low:.4g}, {stats.high:.4g}]",
                     "clipped_pct": round(100 * stats.clipped_share, 3),
                     "p90_steps": rounded(stats.abs_quantile(0.9) / grid.scale, 1) if grid.scale > 0 else None,
                     "diagnosis": "; ".join(range_diagnosis(stats, grid)) or "-"})
    return rows


def consistency_rows(models: DebugModels, measured: Measurements) -> list[dict[str, Any]]:
    """For the stages that should compute (nearly) the same: the first layer more than one step
    apart and the largest difference, in output steps."""
    rows = []
    for a, b in consistency_pairs(measured.stages, models.quant_stage):
        layers = measured.layers.get((a, b), {})
        ordered = [(layer.name, layers[layer.name]) for layer in models.layers if layer.name in layers]
        first = next(((n, s) for n, s in ordered if over_steps(s.max_steps)), None)
        worst = max(ordered, key=lambda item: item[1].max_steps or 0, default=None)
        if worst is not None and not worst[1].max_steps:
            worst = None  # no layer differs at all
        outputs = measured.outputs.get((a, b))
        rows.append({"pair": f"{a} vs {b}", "layers": len(ordered),
                     "expected": "the same integers (one step apart where a float activation is fused)"
                     if b == "deploy" else "close: fake quantization and integer arithmetic round near ties apart",
                     "first_over_1_step": first[0] if first else "-",
                     "its_steps": rounded(first[1].max_steps, 2) if first else None,
                     "most_steps_layer": worst[0] if worst else "-",
                     "most_steps": rounded(worst[1].max_steps or 0, 2) if worst else None,
                     "output_sqnr_db": rounded(outputs.sqnr_db, 2) if outputs else None})
    return rows
