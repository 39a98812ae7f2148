"""`hat sensitivity RECIPE`: rank the recipe's quantized layers by what quantizing each alone costs."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from hatcli.commands._options import JsonOpt, RecipeArg, SetOpt, load, print_json
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat sensitivity recipes/quickstart.toml

  hat sensitivity recipes/quickstart.toml --batches 4

  hat sensitivity recipes/quickstart.toml --json
"""


def sensitivity(
    recipe: RecipeArg,
    batches: Annotated[int | None, typer.Option(min=1, help="Val batches to use (default all).")] = None,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Rank the recipe's quantized layers by what quantizing each alone costs (needs the calibration stage).

    On the recipe's march and calibration; for another, calibrate with --set quant.march=NAME.
    """
    print_sensitivity(load(recipe, overrides), batches, json_out)


def print_sensitivity(lr: Any, batches: int | None, json_out: bool) -> None:
    """Measure `lr`'s per-layer sensitivity on `batches` val batches (default all) and print the
    ranked table, or the report as JSON."""
    # torch-heavy: imported when measuring, so that `hat --help` stays fast
    from hatcli.workflows.sensitivity import layer_sensitivity

    report = layer_sensitivity(lr, batches)
    if json_out:
        print_json(report.to_dict())
        return
    table = Table("rank", "layer", "op", "dtype", f"drop ({report.metric})", "SQNR dB",
                  title=f"quantizing one layer alone, {report.images} val images")
    for i, row in enumerate(report.layers, start=1):
        colour = "red" if row.drop > 0 else "green" if row.drop < 0 else "default"
        table.add_row(str(i), row.layer, row.op, row.dtype, f"[{colour}]{row.drop:+.2f}[/]", f"{row.sqnr_db:.1f}")
    stdout.print(table)
    stdout.print(f"reference (every fake quant off): {report.metric} {report.reference:.2f}")


def register(app: typer.Typer) -> None:
    """Add `hat sensitivity` to the root app."""
    app.command("sensitivity", epilog=EXAMPLES)(sensitivity)
