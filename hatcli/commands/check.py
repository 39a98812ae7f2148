"""`hat check`: can a march run every op of the model on its accelerator? What falls back?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from hatcli.commands._options import JsonOpt, SetOpt, load, print_json
from hatcli.commands._targets import march_name, resolve_onnx
from hatcli.commands.march import print_march, print_march_list
from hatcli.commands.sensitivity import print_sensitivity
from hatcli.errors import UsageError, warn
from hatcli.progress import stdout
from hatcli.quant.march import load_march

EXAMPLES = """
Examples:

  hat check recipes/quickstart.toml

  hat check recipes/quickstart.toml --march nash_e

  hat check --model model.onnx --march bayes --json
"""


def check(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe (checks its exported model).", metavar="[RECIPE]")] = None,
    model: Annotated[Path | None, typer.Option(help="An ONNX file to check instead of a recipe's export.")] = None,
    march: Annotated[str | None, typer.Option(help="bayes, nash_e, nash_m, nash_p or host (default: the recipe's).")] = None,
    # the spellings from before `hat march` and `hat sensitivity`, kept for scripts
    list_marches: Annotated[bool, typer.Option("--list-marches", hidden=True)] = False,
    sensitivity: Annotated[bool, typer.Option("--sensitivity", hidden=True)] = False,
    batches: Annotated[int | None, typer.Option(min=1, hidden=True)] = None,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check every op against the march profile; exit 1 when some fall back to the CPU."""
    profile = load_march(march) if march is not None else None  # a bad --march is reported first
    if list_marches:
        if profile is not None:
            warn("`hat check --list-marches --march NAME` is now `hat march show NAME`")
            print_march(profile, json_out)
        else:
            warn("`hat check --list-marches` is now `hat march list`")
            print_march_list(json_out)
        return
    if sensitivity:
        _old_sensitivity(recipe, model, march, batches, overrides, json_out)
        return
    if batches is not None:
        raise UsageError("--batches applies to --sensitivity")
    from hatcli.deploy.check import check_model

    onnx_path, lr = resolve_onnx(recipe, model, overrides)
    profile = load_march(march_name(march, lr))
    report = check_model(onnx_path, profile)
    if json_out:
        print_json(report.to_dict())
    else:
        table = Table("node", "module", "op", "runs on", "reason")
        for row in report.rows:
            colour = "green" if row.status == "BPU" else "yellow"
            table.add_row(row.node, row.module or "-", row.op_type, f"[{colour}]{row.status}[/]", row.reason)
        stdout.print(table)
        for record in report.bias_saturation:
            stdout.print(f"[yellow]saturated bias[/] {escape(record.describe())}", highlight=False)
        for record in report.accumulator_overflow:
            stdout.print(f"[yellow]accumulator[/] {escape(record.describe())}", highlight=False)
        verdict = "[green]supported[/]" if report.supported else f"[yellow]{report.fallbacks} ops fall back[/]"
        stdout.print(f"{onnx_path} on {profile.name}: {verdict}")
    if not report.supported:
        raise typer.Exit(1)


def _old_sensitivity(recipe: Path | None, model: Path | None, march: str | None, batches: int | None,
                     overrides: list[str] | None, json_out: bool) -> None:
    """`hat check RECIPE --sensitivity`, the old spelling of `hat sensitivity RECIPE`."""
    if recipe is None or model is not None:
        raise UsageError("--sensitivity needs a RECIPE (not --model): it measures the recipe's calibrated model")
    lr = load(recipe, overrides)
    if march and march != lr.recipe.quant.march:
        raise UsageError(f"--sensitivity uses the recipe's march (`{lr.recipe.quant.march}`) and calibration; "
                         f"to try `{march}`, use --set quant.march={march} and calibrate again")
    warn("`hat check RECIPE --sensitivity` is now `hat sensitivity RECIPE`")
    print_sensitivity(lr, batches, json_out)


def register(app: typer.Typer) -> None:
    """Add `hat check` to the root app."""
    app.command("check", epilog=EXAMPLES)(check)
