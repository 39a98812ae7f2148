"""The models `hat debug` compares: which stages a run has, and each one built so that its layers
can be read (`hatcli.workflows.debug_capture`).

Every torch stage is the same prepared graph, so its layers are the same nodes: `float` is the
graph built from the float checkpoint with every fake quant off (the float model with BatchNorm
folded into the convolutions, as every later stage has it), `calibration` and `qat` load their
checkpoints into copies of it, `int_infer` is the integer program converted from the quantized
stage (QAT, or calibration when QAT is off), as `hat eval --stage int_infer` builds it. `deploy`
is the compiled artifact of the recipe's march and opt level, its layers found through the
exported model it was compiled from.

One stage exists only here: `qat_float`, the QAT model's own weights computed in float (every fake
quant off). QAT moves the weights, so float against int_infer mixes what training changed with what
quantization costs; qat_float against int_infer is quantization alone, as float against int_infer
is when QAT is off (the calibration keeps the float weights). It is the default pair's reference
whenever the run has a QAT stage (`default_pair`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from torch.fx import GraphModule

from hatcli.deploy.layer_tensors import CaptureSession, export_layer_tensors
from hatcli.deploy.runtime import load_artifact, sha256_file
from hatcli.engine.checkpoint import load_checkpoint
from hatcli.errors import UsageError
from hatcli.quant import flow
from hatcli.quant.integer import integer_program
from hatcli.quant.layer_graph import LayerGraph, layer_kind, program_nodes
from hatcli.quant.march import load_march
from hatcli.quant.sensitivity import QuantLayer, enable_only, fake_quant_modules, find_layers
from hatcli.recipe import LoadedRecipe
from hatcli.stages import (
    EVAL_STAGES,
    UPSTREAM,
    checkpoint_path,
    default_compile_dir,
    default_export_dir,
    quant_source,
    stage_dir,
    warn_unfinished,
)
from hatcli.workflows.debug_capture import ArtifactCapture, GraphCapture
from hatcli.workflows.stage_models import build_prepared


DEBUG_STAGES = ("float", "calibration", "qat_float", "qat", "int_infer", "deploy")
"""The stages `hat debug` compares, in the order they are shown: the evaluation stages and qat_float."""
QAT_FLOAT = "qat_float"


def default_pair(lr: LoadedRecipe) -> tuple[str, str]:
    """The pair traced when none is asked for: the quantized model's own weights in float against
    the integer program, so that only quantization is measured - `qat_float,int_infer` when QAT is
    on, else `float,int_infer` (the calibration keeps the float weights)."""
    return (QAT_FLOAT if quant_source(lr) == "qat" else "float", "int_infer")


def stage_command(lr: LoadedRecipe, stage: str) -> str:
    """The command that makes `stage` of `lr`'s run, or the first stage it is built on that is
    missing too (calibration before QAT, ...)."""
    if stage == "deploy":  # `hat run` makes the stages it is built on as well
        return f"hat compile {lr.path}" if has_stage(lr, "int_infer") else f"hat run {lr.path}"
    train = quant_source(lr) if stage == "int_infer" else "qat" if stage == QAT_FLOAT else stage
    while UPSTREAM.get(train) and not has_stage(lr, UPSTREAM[train]):
        train = UPSTREAM[train]
    return f"hat train {lr.path} --stage {train}"


def compiled_dir(lr: LoadedRecipe) -> Path:
    """The artifact `deploy` means: the recipe's march and opt level."""
    return default_compile_dir(lr, lr.recipe.quant.march, lr.recipe.deploy.opt)


def has_stage(lr: LoadedRecipe, stage: str) -> bool:
    """Whether the run holds what `stage` needs (a checkpoint; for deploy a compiled artifact)."""
    if stage == QAT_FLOAT:
        return has_stage(lr, "qat")
    if stage == "qat" and not lr.recipe.qat.enabled:
        return False
    if stage in ("float", "calibration", "qat"):
        return any(stage_dir(lr, stage).glob("checkpoint*.pt"))
    if stage == "int_infer":
        return has_stage(lr, quant_source(lr))
    return (compiled_dir(lr) / "manifest.json").is_file()


def choose_stages(lr: LoadedRecipe, stages: list[str] | None, pair: tuple[str, str]) -> list[str]:
    """The stages to compare, in stage order: those asked for (default every one the run has),
    always with float and the pair (qat_float only when asked for or in the pair). UsageError for
    an unknown stage or one the run lacks, naming the command that makes it."""
    for stage in [*(stages or []), *pair]:
        if stage not in DEBUG_STAGES:
            raise UsageError(f"unknown stage `{stage}`; choose from {', '.join(DEBUG_STAGES)}")
    if pair[0] == pair[1]:
        raise UsageError(f"--pair compares a stage with itself ({pair[0]}); name two stages, e.g. float,int_infer")
    wanted = set(stages) if stages else {s for s in EVAL_STAGES if has_stage(lr, s)}
    wanted |= {"float", *pair}
    # qat_float last: a missing QAT is reported as the stage the user knows (qat, int_infer)
    for stage in sorted((s for s in DEBUG_STAGES if s in wanted), key=lambda s: s == QAT_FLOAT):
        if stage in ("qat", QAT_FLOAT) and not lr.recipe.qat.enabled:
            raise UsageError(f"{lr.path}: QAT is off in this recipe (`qat.enabled = false`): there is no qat stage "
                             f"to debug; leave it out of --stages / --pair")
        if not has_stage(lr, stage):
            made_by = quant_source(lr) if stage == "int_infer" else "qat" if stage == QAT_FLOAT else stage
            where = compiled_dir(lr) if stage == "deploy" else stage_dir(lr, made_by)
            raise UsageError(f"stage `{stage}` has not been made yet (nothing in {where}): run "
                             f"`{stage_command(lr, stage)}` first")
    return [s for s in DEBUG_STAGES if s in wanted]


@dataclass
class StageModel:
    """One stage ready to compare: its ordinary callable and its capturing one."""

    name: str
    model: Callable[[Any], Any]
    """batch -> outputs, as `hat eval` runs the stage."""
    capture: Callable[[Any], Any]
    """batch -> (outputs, {layer: float output}): `GraphCapture` / `ArtifactCapture`."""
    layers_found: int = 0
    note: str = ""


@dataclass
class DebugModels:
    """The stages built for one debug run, with the layers of the quantized graph."""

    quant_stage: str
    """The stage int_infer and the artifact are made from (qat, or calibration)."""
    quant_graph: GraphModule
    float_graph: GraphModule
    layers: list[QuantLayer]
    graph: LayerGraph
    """The layers of `quant_graph`."""
    stages: dict[str, StageModel] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)


def _eval_float(prepared: GraphModule) -> GraphModule:
    """A prepared graph computing in float: every fake quant and observer off."""
    flow.set_mode(prepared, "eval")
    enable_only(prepared, [])
    for module in fake_quant_modules(prepared).values():
        module.disable_observer()
    return prepared


def _graph_stage(name: str, gm: GraphModule, graph: LayerGraph) -> StageModel:
    """A prepared graph (its fake quants return float values: no grid needed to read them)."""
    nodes = {layer.name: graph.output_node(layer).name for layer in graph.layers}
    return StageModel(name, gm, GraphCapture(gm, nodes, {}), len(nodes))


def _layer_keys(graph: LayerGraph) -> list[tuple[str, str, str]]:
    return [(layer.name, graph.anchor_path(layer), layer_kind(layer.op)) for layer in graph.layers]


def _integer_stage(lr: LoadedRecipe, quant: GraphModule, graph: LayerGraph) -> StageModel:
    """The integer program, as `stage_model(lr, "int_infer")` builds it, with its layers' nodes."""
    reference = flow.convert_to_integer(copy.deepcopy(quant))
    program = integer_program(reference, load_march(lr.recipe.quant.march).quant.accumulator_bits)
    nodes = {name: node.name for name, node in program_nodes(program, _layer_keys(graph)).items()}
    grids = {layer.name: graph.output_grid(layer) for layer in graph.layers}
    return StageModel("int_infer", program, GraphCapture(program, nodes, grids), len(nodes))


def _export_model(artifact: Path, manifest: dict[str, Any], lr: LoadedRecipe) -> Path | None:
    """The exported model an artifact was compiled from: its manifest's `source` while it is
    unchanged, else the run's export."""
    source = manifest.get("source") or {}
    if isinstance(source.get("path"), str):
        path = (artifact / source["path"]).resolve()
        if path.is_file() and sha256_file(path) == source.get("sha256"):
            return path
    fallback = default_export_dir(lr) / "model.onnx"
    return fallback if fallback.is_file() else None


def _artifact_stage(lr: LoadedRecipe, graph: LayerGraph) -> StageModel:
    folder = compiled_dir(lr)
    runner = load_artifact(folder)
    manifest = runner.manifest or {}
    export = _export_model(folder, manifest, lr)
    tensors = export_layer_tensors(onnx.load(str(export)), _layer_keys(graph)) if export else {}
    level = (manifest.get("session_options") or {}).get("graph_optimization_level", "ORT_ENABLE_ALL")
    session = CaptureSession(runner.model_path, [ref.tensor for ref in tensors.values()], level)
    capture = ArtifactCapture(session, tensors)

    def run(images: Any) -> Any:
        import torch

        outputs = [torch.from_numpy(out) for out in runner.run(images.detach().cpu().numpy())]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    note = "" if export else f"no exported model to place the artifact's layers: run `hat export {lr.path}`"
    return StageModel("deploy", run, capture, len(capture.tensors), note)


def build_models(lr: LoadedRecipe, stages: list[str]) -> DebugModels:
    """Build every stage in `stages` (see the module docstring) and the quantized graph's layers."""
    base, state, _ = build_prepared(lr)
    quant_stage = quant_source(lr)
    loaded: dict[str, GraphModule] = {}
    for stage in ("calibration", "qat"):
        if stage in stages or stage == quant_stage or (stage == "qat" and QAT_FLOAT in stages):
            warn_unfinished(lr, stage, f"the {stage} model")
            gm = copy.deepcopy(base)
            gm.load_state_dict(load_checkpoint(checkpoint_path(lr, stage))["model"])
            flow.set_mode(gm, "eval")
            loaded[stage] = gm
    warn_unfinished(lr, "float", "the float model")
    float_graph = _eval_float(base)
    quant = loaded[quant_stage]
    layers = find_layers(quant)
    graph = LayerGraph(quant, layers)
    models = DebugModels(quant_stage, quant, float_graph, layers, graph, classes=list(state.get("classes", [])))
    for stage in stages:
        if stage == "float":
            models.stages[stage] = _graph_stage(stage, float_graph, LayerGraph(float_graph, layers))
        elif stage == QAT_FLOAT:
            own = _eval_float(copy.deepcopy(loaded["qat"]))
            models.stages[stage] = _graph_stage(stage, own, LayerGraph(own, layers))
        elif stage in loaded:
            models.stages[stage] = _graph_stage(stage, loaded[stage], graph if stage == quant_stage
                                                else LayerGraph(loaded[stage], layers))
        elif stage == "int_infer":
            models.stages[stage] = _integer_stage(lr, quant, graph)
        elif stage == "deploy":
            models.stages[stage] = _artifact_stage(lr, graph)
    return models
