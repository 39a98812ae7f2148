"""`hat eval RECIPE --stage S`: metrics of one stage on the packed val set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hatcli.commands._options import JsonOpt, RecipeArg, SetOpt, load, print_json, print_metrics

EXAMPLES = """
Examples:

  hat eval recipes/quickstart.toml --stage float

  hat eval recipes/quickstart.toml --stage int_infer --json

  hat eval recipes/quickstart.toml --stage deploy --artifact runs/quickstart/compile/nash_e-O3
"""


def evaluate(
    recipe: RecipeArg,
    stage: Annotated[str, typer.Option(help="float, calibration, qat, int_infer or deploy.")] = "float",
    artifact: Annotated[Path | None, typer.Option(help="Compiled artifact folder (deploy stage).")] = None,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a stage: top-1/top-5 (classification) in percent."""
    from hatcli.engine.stages import evaluate_stage

    lr = load(recipe, overrides)
    result = evaluate_stage(lr, stage, artifact)
    print_json(result) if json_out else print_metrics(stage, result["metrics"])


def register(app: typer.Typer) -> None:
    """Add `hat eval` to the root app."""
    app.command("eval", epilog=EXAMPLES)(evaluate)
