"""`hat export`'s files: the integer program (`model.pt2`) and the ONNX QDQ model, with a manifest.

Which stage is exported and its conversion to an integer program are
`hatcli.workflows.exporting.export_stage`'s; this module writes the folder from the converted model.

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
from hatcli.deploy.bias_check import write_bias_records
from hatcli.deploy.consumer import consumer_spec
from hatcli.deploy.folders import building
from hatcli.deploy.low_bit_check import write_low_bit_records
from hatcli.deploy.runtime import sha256_file
from hatcli.errors import HatError
from hatcli.inputs import input_color_space
from hatcli.quant.flow import export_program
from hatcli.quant.low_bit_records import low_bit_layers
from hatcli.recipe import LoadedRecipe
from hatcli.stages import export_fingerprint

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


def write_export(lr: LoadedRecipe, model: torch.fx.GraphModule, classes: list[str], source: str, out_dir: Path,
                 started: float | None = None) -> dict[str, Any]:
    """Write model.pt2, model.onnx, recipe.toml and manifest.json into `out_dir` for the integer
    program `model` converted from stage `source`. The folder is built beside `out_dir` and
    renamed into place at the end: a failed export leaves the previous export, or nothing.
    `started` (a `time.perf_counter()` value) is when the export began, for the seconds reported.
    The low-bit layers conversion kept on `model` (`hatcli.quant.low_bit_records`) go into the
    manifest (`low_bit_layers`) and the ONNX metadata (`hat.low_bit_layers`), for `hat check`."""
    tic = time.perf_counter() if started is None else started
    with building(out_dir, "manifest.json") as tmp_dir:
        example = lr.family.example_inputs(tuple(lr.recipe.data.input_size), batch=2)
        program = export_program(model, example)
        pt2, onnx_path = tmp_dir / "model.pt2", tmp_dir / "model.onnx"
        torch.export.save(program, str(pt2))
        output_names = list(lr.family.output_names)
        export_onnx(program, example, onnx_path, output_names)
        saturation = list(getattr(model, "bias_saturation", []))
        write_bias_records(str(onnx_path), saturation)
        low_bit = low_bit_layers(model)  # what prepare_quantized recorded, kept by conversion
        write_low_bit_records(str(onnx_path), low_bit)
        output_spec = output_specs(onnx_path)
        manifest = {
            "format": "hat-export", "version": 1, "family": lr.family.name,
            "source_stage": source, "march": lr.recipe.quant.march, "input": input_spec(lr),
            "outputs": output_names, "output_spec": output_spec,
            **consumer_spec(lr, output_spec, classes),
            "fingerprint": export_fingerprint(lr, source),
            "recipe_sha256": lr.sha256, "hatcli_version": __version__, "torch_version": torch.__version__,
            "files": {p.name: sha256_file(p) for p in (pt2, onnx_path)},
        }
        if saturation:
            manifest["bias_saturation"] = [record.to_dict() for record in saturation]
        if low_bit:
            manifest["low_bit_layers"] = [record.to_dict() for record in low_bit]
        atomic_write_text(tmp_dir / "recipe.toml", lr.to_toml())
        atomic_write_json(tmp_dir / "manifest.json", manifest)
    names = ("model.pt2", "model.onnx", "manifest.json")
    return {"out_dir": str(out_dir), "stage": source, "files": [str(out_dir / n) for n in names],
            "seconds": round(time.perf_counter() - tic, 2), "manifest": manifest}
