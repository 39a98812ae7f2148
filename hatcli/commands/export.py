"""`hat export RECIPE`: the integer program (.pt2) and the ONNX QDQ model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hatcli.commands._options import JsonOpt, RecipeArg, SetOpt, load, print_json
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat export recipes/quickstart.toml

  hat export recipes/quickstart.toml --out build/quickstart

  hat export recipes/quickstart.toml --stage calibration     # post-training quantization, no QAT
"""


def export(
    recipe: RecipeArg,
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<task>/export).")] = None,
    stage: Annotated[str | None, typer.Option(help="calibration (post-training quantization) or qat (default: qat, "
                                                   "or calibration when `qat.enabled = false`).")] = None,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Convert the QAT model (or the calibration model: `--stage calibration`, or when
    `qat.enabled = false`) to the integer program and write model.pt2 + model.onnx."""
    from hatcli.stages import default_export_dir
    from hatcli.workflows.exporting import export_stage

    lr = load(recipe, overrides)
    result = export_stage(lr, out or default_export_dir(lr), stage)
    if json_out:
        print_json({k: v for k, v in result.items() if k != "manifest"})
        return
    for path in result["files"]:
        stdout.print(f"[green]wrote[/] {path}")
    stdout.print(f"exported the {result['stage']} model")


def register(app: typer.Typer) -> None:
    """Add `hat export` to the root app."""
    app.command("export", epilog=EXAMPLES)(export)
