"""Faults planted in a copy of a trained run, for the tests of `hat debug` (tests/test_debug.py).

Each planting edits what a user's run could hold - a checkpoint, the recipe, the compiled
artifact - and nothing in hat: a calibration range cut to a tenth, a layer forced to 4 bits, an
int16 layer made int8, a dead weight channel, a layer the compiler left float. Where a fault
lives is found the way a user would: the quantized graph's layers (`find_layers`) and their
modules.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from hatcli.deploy.runtime import sha256_file
from hatcli.main import run_cli
from hatcli.deploy.layer_tensors import export_layer_tensors
from hatcli.quant.layer_graph import LayerGraph, graph_attribute
from hatcli.quant.sensitivity import find_layers
from hatcli.recipe import load_recipe
from hatcli.workflows.stage_models import load_prepared

QAT_OFF = ("[qat]\n", "[qat]\nenabled = false\n")
"""A recipe edit that makes calibration the quantized stage (int_infer is converted from it)."""


def copy_run(recipe: Path, folder: Path, *edits: tuple[str, str], append: str = "") -> Path:
    """A copy of `recipe`'s run folder under `folder`, and the recipe pointing at it with `edits`
    (text replacements) and `append`ed TOML."""
    folder.mkdir(parents=True, exist_ok=True)
    text = recipe.read_text()
    old_runs = recipe.parent / "runs"
    shutil.copytree(old_runs, folder / "runs", ignore=shutil.ignore_patterns("debug", "report.html"))
    text = text.replace(str(old_runs), str(folder / "runs"))
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = folder / recipe.name
    path.write_text(text + append)
    return path


def _layers(recipe: Path, stage: str) -> tuple[LayerGraph, dict]:
    lr = load_recipe(recipe)
    prepared, _ = load_prepared(lr, stage)
    return LayerGraph(prepared, find_layers(prepared)), {layer.name: layer for layer in find_layers(prepared)}


def _checkpoint(recipe: Path, stage: str) -> Path:
    folder = recipe.parent / "runs" / load_recipe(recipe).recipe.task / stage
    return next(p for p in (folder / "checkpoint-best.pt", folder / "checkpoint.pt") if p.exists())


def cut_range(recipe: Path, stage: str, layer: str, factor: float = 0.1) -> None:
    """Cut the calibrated output range of `layer` in `stage`'s checkpoint to `factor` of itself."""
    graph, layers = _layers(recipe, stage)
    module = str(graph.output_node(layers[layer]).target)
    path = _checkpoint(recipe, stage)
    state = torch.load(path, weights_only=True)
    model = state["model"]
    model[f"{module}.scale"] = model[f"{module}.scale"] * factor
    for key in ("min_val", "max_val"):
        model[f"{module}.activation_post_process.{key}"] = model[f"{module}.activation_post_process.{key}"] * factor
    torch.save(state, path)


def kill_channel(recipe: Path, stage: str, layer: str) -> int:
    """Zero the weights of `layer`'s strongest output channel in `stage`'s checkpoint (the one a
    trained layer would miss most); returns it."""
    graph, layers = _layers(recipe, stage)
    key = next(t for t in graph.parameter_targets(layers[layer]) if t.endswith(".weight"))
    channel = strongest_channel(recipe, stage, layer)
    path = _checkpoint(recipe, stage)
    state = torch.load(path, weights_only=True)
    state["model"][key][channel] = 0
    torch.save(state, path)
    return channel


def outlier_channel(recipe: Path, block: int, factor: float = 100.0) -> str:
    """Make one channel of MobileNet block `block`'s pointwise output `factor` times larger in the
    float checkpoint, and the next block's depthwise conv (one weight per channel, so its scale
    follows) `factor` times smaller: the float model computes the same, but that tensor's range
    is now set by one channel, and on an 8-bit grid the others keep a step or two. Returns the
    layer (`features.<block>.1.0`)."""
    path = _checkpoint(recipe, "float")
    state = torch.load(path, weights_only=True)
    model = state["model"]
    gamma, beta = model[f"features.{block}.1.1.weight"], model[f"features.{block}.1.1.bias"]
    channel = int(gamma.abs().argmax())
    gamma[channel] *= factor
    beta[channel] *= factor
    model[f"features.{block + 1}.0.0.weight"][channel] /= factor
    torch.save(state, path)
    return f"features.{block}.1.0"


def calibrate(recipe: Path) -> None:
    """Calibrate the copy again (after a recipe or float-checkpoint edit)."""
    assert run_cli(["train", str(recipe), "--stage", "calibration"]) == 0


def leave_float(recipe: Path, layer: str) -> None:
    """Make the compiled artifact compute `layer` in float, as a compiler that left it on the CPU
    would: its integer conv becomes dequantize -> float conv (the quantized model's float weights
    and bias) -> quantize; the manifest's checksum follows the edit."""
    graph, layers = _layers(recipe, "qat" if load_recipe(recipe).recipe.qat.enabled else "calibration")
    node = graph.anchor(layers[layer])
    weight, bias = (graph_attribute(graph.prepared, str(a.args[0].target)) for a in node.args[1:3])
    lr = load_recipe(recipe)
    art = lr.run_dir / "compile" / f"{lr.recipe.quant.march}-O{lr.recipe.deploy.opt}"
    export = onnx.load(str(lr.run_dir / "export" / "model.onnx"))
    tensor = export_layer_tensors(export, [(layer, graph.anchor_path(layers[layer]), "weighted")])[layer].tensor
    model = onnx.load(str(art / "model.onnx"))
    conv = next(n for n in model.graph.node if tensor in n.output and n.op_type == "QLinearConv")
    x, x_scale, x_zero, _, _, _, y_scale, y_zero = conv.input[:8]
    attrs = [a for a in conv.attribute]
    names = {"w": f"{layer}_float_weight", "b": f"{layer}_float_bias", "x": f"{layer}_float_in",
             "y": f"{layer}_float_out"}
    model.graph.initializer.extend([numpy_helper.from_array(weight.detach().numpy().astype(np.float32), names["w"]),
                                    numpy_helper.from_array(bias.detach().numpy().astype(np.float32), names["b"])])
    nodes = [helper.make_node("DequantizeLinear", [x, x_scale, x_zero], [names["x"]]),
             helper.make_node("Conv", [names["x"], names["w"], names["b"]], [names["y"]]),
             helper.make_node("QuantizeLinear", [names["y"], y_scale, y_zero], [tensor])]
    nodes[1].attribute.extend(attrs)
    position = list(model.graph.node).index(conv)
    model.graph.node.remove(conv)
    for offset, new in enumerate(nodes):
        model.graph.node.insert(position + offset, new)
    onnx.save(model, str(art / "model.onnx"))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(art / "model.onnx")
    (art / "manifest.json").write_text(json.dumps(manifest))


def strongest_channel(recipe: Path, stage: str, layer: str) -> int:
    """The output channel of `layer` that carries the most signal on a batch of val images."""
    from hatcli.engine.loaders import build_loader
    from hatcli.quant.flow import set_mode
    from hatcli.quant.sensitivity import enable_only
    from hatcli.workflows.debug_capture import GraphCapture

    graph, layers = _layers(recipe, stage)
    set_mode(graph.prepared, "eval")
    enable_only(graph.prepared, [])
    images, _ = next(iter(build_loader(load_recipe(recipe), "val")))
    _, values = GraphCapture(graph.prepared, {layer: graph.output_node(layers[layer]).name}, {})(images)
    return int(values[layer].abs().mean(dim=(0, 2, 3)).argmax())
