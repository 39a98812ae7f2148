"""`hat export`: the integer program (`model.pt2`) and the ONNX QDQ model, with a manifest.

Both files load without any project code: `import torchao` (which registers the
`quantized_decomposed` operators) then `torch.export.load("model.pt2").module()`, and
`onnxruntime.InferenceSession("model.onnx")`.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from hatcli import __version__
from hatcli.atomic import atomic_write_json, atomic_write_text
from hatcli.deploy.consumer import consumer_spec
from hatcli.deploy.folders import building
from hatcli.deploy.runtime import sha256_file
from hatcli.errors import ArtifactError, HatError, UsageError
from hatcli.inputs import input_color_space
from hatcli.recipe import LoadedRecipe, recipe_hash

INPUT_NAME = "image"


def input_spec(lr: LoadedRecipe) -> dict[str, Any]:
    """What the deployed model expects: shape, dtype, layout, colour space and normalization."""
    h, w = lr.recipe.data.input_size
    return {"name": INPUT_NAME, "shape": ["N", 3, h, w], "dtype": "float32", "layout": "NCHW",
            "color_space": input_color_space(lr), "mean": list(lr.recipe.data.mean), "std": list(lr.recipe.data.std),
            "scale": "pixel values 0..255, then (x - mean) / std per channel"}


def output_specs(onnx_path: Path) -> list[dict[str, Any]]:
    """Name, shape (`"N"` for the free batch) and dtype of every output of an ONNX model."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    specs = []
    for output in graph.output:
        tensor = output.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else "N" for d in tensor.shape.dim]
        specs.append({"name": output.name, "shape": dims,
                      "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name})
    return specs


def export_onnx(program: torch.export.ExportedProgram, example: tuple, path: Path, output_names: list[str]) -> None:
    """Write the ONNX QDQ model of an exported integer program (exporter chatter kept off stdout)."""
    tmp = path.with_name(f".{path.name}.tmp")
    chatter = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            torch.onnx.export(program, example, str(tmp), dynamo=True, input_names=[INPUT_NAME],
                              output_names=output_names, external_data=False, opset_version=21)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        print(chatter.getvalue(), file=sys.stderr)
        raise HatError(f"ONNX export failed: {str(exc).splitlines()[0]}") from exc
    tmp.replace(path)


EXPORTABLE_STAGES = ("calibration", "qat")
"""Stages whose model can be exported: calibration (post-training quantization) or QAT."""


def export_source(lr: LoadedRecipe, stage: str | None = None) -> str:
    """The stage to export: `stage`, or the recipe's (QAT, calibration when `qat.enabled = false`).

    Checked before any work: UsageError for another stage name or for `qat` with QAT disabled,
    ArtifactError (saying how to get one) when the stage has no checkpoint yet.
    """
    from hatcli.engine.stages import quant_source, stage_dir

    if stage is not None and stage not in EXPORTABLE_STAGES:
        raise UsageError(f"--stage: cannot export `{stage}`; choose calibration (post-training quantization) "
                         "or qat")
    source = stage or quant_source(lr)
    if source == "qat" and not lr.recipe.qat.enabled:
        raise UsageError(f"{lr.path}: QAT is disabled (`qat.enabled = false`); export the calibration model "
                         f"with `hat export {lr.path}` (or `--stage calibration`)")
    folder = stage_dir(lr, source)
    if not any(folder.glob("checkpoint*.pt")):
        if source == "qat" and any(stage_dir(lr, "calibration").glob("checkpoint*.pt")):
            raise ArtifactError(f"no QAT checkpoint in {folder}: train it with `hat train {lr.path} --stage qat`, "
                                f"or export the calibration (post-training quantization) model with "
                                f"`hat export {lr.path} --stage calibration`")
        raise ArtifactError(f"no {source} checkpoint in {folder}; run `hat train {lr.path} --stage {source}` first")
    return source


def export_fingerprint(lr: LoadedRecipe, source: str) -> str:
    """What an export of `source` depends on; for the recipe's own source stage it is the `export`
    fingerprint that `hat run` compares."""
    from hatcli.engine.stages import fingerprint, quant_source

    if source == quant_source(lr):
        return fingerprint(lr, "export")
    return recipe_hash([fingerprint(lr, source), lr.resolved["data"]["input_size"]])


def export_stage(lr: LoadedRecipe, out_dir: Path, stage: str | None = None) -> dict[str, Any]:
    """Convert the QAT or calibration checkpoint (`export_source`) and write model.pt2, model.onnx,
    recipe.toml and manifest.json into `out_dir`. The folder is built beside `out_dir` and renamed
    into place at the end: a failed export leaves the previous export, or nothing."""
    from hatcli.engine.stages import integer_model
    from hatcli.quant.flow import export_program

    tic = time.perf_counter()
    source = export_source(lr, stage)
    with building(out_dir, "manifest.json") as tmp_dir:
        model, state = integer_model(lr, source)
        example = lr.family.example_inputs(tuple(lr.recipe.data.input_size), batch=2)
        program = export_program(model, example)
        pt2, onnx_path = tmp_dir / "model.pt2", tmp_dir / "model.onnx"
        torch.export.save(program, str(pt2))
        output_names = list(lr.family.output_names)
        export_onnx(program, example, onnx_path, output_names)
        output_spec = output_specs(onnx_path)
        manifest = {
            "format": "hat-export", "version": 1, "family": lr.family.name,
            "source_stage": source, "march": lr.recipe.quant.march, "input": input_spec(lr),
            "outputs": output_names, "output_spec": output_spec,
            **consumer_spec(lr, output_spec, state["classes"]),
            "fingerprint": export_fingerprint(lr, source),
            "recipe_sha256": lr.sha256, "hatcli_version": __version__, "torch_version": torch.__version__,
            "files": {p.name: sha256_file(p) for p in (pt2, onnx_path)},
        }
        atomic_write_text(tmp_dir / "recipe.toml", lr.to_toml())
        atomic_write_json(tmp_dir / "manifest.json", manifest)
    names = ("model.pt2", "model.onnx", "manifest.json")
    return {"out_dir": str(out_dir), "stage": source, "files": [str(out_dir / n) for n in names],
            "seconds": round(time.perf_counter() - tic, 2), "manifest": manifest}
