"""Export a stage: pick the checkpoint (`export_source`), convert it to the integer program, and
write the export folder (`hatcli.deploy.export.write_export`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hatcli.deploy.export import write_export
from hatcli.deploy.folders import check_out_dir
from hatcli.recipe import LoadedRecipe
from hatcli.stages import export_source
from hatcli.workflows.stage_models import integer_model


def export_stage(lr: LoadedRecipe, out_dir: Path, stage: str | None = None) -> dict[str, Any]:
    """Convert the QAT or calibration checkpoint (`export_source`) and write model.pt2, model.onnx,
    recipe.toml and manifest.json into `out_dir`. The folder is built beside `out_dir` and renamed
    into place at the end: a failed export leaves the previous export, or nothing."""
    tic = time.perf_counter()
    source = export_source(lr, stage)
    check_out_dir(out_dir, "manifest.json")  # refuse a foreign folder before the conversion work
    model, state = integer_model(lr, source)
    return write_export(lr, model, state["classes"], source, out_dir, started=tic)
