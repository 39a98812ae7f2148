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
from hatcli.deploy.runtime import sha256_file
from hatcli.atomic import atomic_write_json, atomic_write_text
from hatcli.errors import HatError
from hatcli.recipe import LoadedRecipe

INPUT_NAME = "image"


def input_spec(lr: LoadedRecipe) -> dict[str, Any]:
    """What the deployed model expects: shape, dtype, layout, colour space and normalization."""
    from hatcli.engine.loaders import input_color_space

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


def export_stage(lr: LoadedRecipe, out_dir: Path) -> dict[str, Any]:
    """Convert the QAT (or calibration) checkpoint and write model.pt2, model.onnx, manifest.json."""
    from hatcli.engine.stages import fingerprint, integer_model, quant_source
    from hatcli.quant.flow import export_program

    tic = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    model, state = integer_model(lr)
    example = lr.family.example_inputs(tuple(lr.recipe.data.input_size), batch=2)
    program = export_program(model, example)
    pt2 = out_dir / "model.pt2"
    tmp = out_dir / ".model.tmp.pt2"
    torch.export.save(program, str(tmp))
    tmp.replace(pt2)
    onnx_path = out_dir / "model.onnx"
    output_names = list(getattr(lr.family, "output_names", ["output"]))
    export_onnx(program, example, onnx_path, output_names)
    manifest = {
        "format": "hat-export", "version": 1, "task": lr.recipe.task, "family": lr.family.name,
        "source_stage": quant_source(lr), "march": lr.recipe.quant.march, "input": input_spec(lr),
        "outputs": output_names, "output_spec": output_specs(onnx_path), "kind": lr.family.task,
        "classes": state["classes"], "fingerprint": fingerprint(lr, "export"),
        "recipe_sha256": lr.sha256, "hatcli_version": __version__, "torch_version": torch.__version__,
        "files": {p.name: sha256_file(p) for p in (pt2, onnx_path)},
    }
    atomic_write_text(out_dir / "recipe.toml", lr.to_toml())
    atomic_write_json(out_dir / "manifest.json", manifest)
    return {"out_dir": str(out_dir), "files": [str(pt2), str(onnx_path), str(out_dir / "manifest.json")],
            "seconds": round(time.perf_counter() - tic, 2), "manifest": manifest}
