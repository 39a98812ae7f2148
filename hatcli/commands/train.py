"""`hat train RECIPE --stage float|calibration|qat`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hatcli.commands._options import JsonOpt, RecipeArg, SetOpt, load, print_json, print_metrics
from hatcli.errors import UsageError

EXAMPLES = """
Examples:

  hat train recipes/quickstart.toml --stage float

  hat train recipes/quickstart.toml --stage calibration

  hat train recipes/quickstart.toml --stage qat --set qat.epochs=2
"""


def train(
    recipe: RecipeArg,
    stage: Annotated[str, typer.Option(help="float, calibration or qat.")] = "float",
    resume: Annotated[bool, typer.Option(help="Continue from the stage's last checkpoint.")] = False,
    from_path: Annotated[Path | None, typer.Option("--from", help="Start from this checkpoint instead of the previous stage's.")] = None,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train one stage; each stage starts from the previous stage's best checkpoint."""
    from hatcli.engine import stages

    lr = load(recipe, overrides)
    if stage == "float":
        if from_path is not None:
            raise UsageError("--from applies to calibration and qat (float training starts from scratch)")
        record = stages.train_float(lr, resume=resume)
    elif stage == "calibration":
        record = stages.calibrate(lr, from_path=from_path)
    elif stage == "qat":
        record = stages.train_qat(lr, resume=resume, from_path=from_path)
    else:
        raise UsageError(f"unknown stage `{stage}`; choose float, calibration or qat")
    if json_out:
        print_json(record)
    else:
        print_metrics(f"{stage} ({record['seconds']:.0f}s) -> {stages.stage_dir(lr, stage)}", record["metrics"])


def register(app: typer.Typer) -> None:
    """Add `hat train` to the root app."""
    app.command("train", epilog=EXAMPLES)(train)
