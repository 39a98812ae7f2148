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

Exit codes: 0 every op runs on the march; 1 some ops fall back to the CPU, or the recipe cannot be
deployed at all (a low-bit scheme with no integer form, e.g. lqnet: said without an export);
2 bad usage.
"""


def check(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe (checks its exported model).", metavar="[RECIPE]")] = None,
    model: Annotated[Path | None, typer.Option(help="An ONNX file to check instead of a recipe's export.")] = None,
    march: Annotated[str | None, typer.Option(help="A march (`hat march list`) or a profile .toml (default: the recipe's).")] = None,
    # the spellings from before `hat march` and `hat sensitivity`, kept for scripts
    list_marches: Annotated[bool, typer.Option("--list-marches", hidden=True)] = False,
    sensitivity: Annotated[bool, typer.Option("--sensitivity", hidden=True)] = False,
    batches: Annotated[int | None, typer.Option(min=1, hidden=True)] = None,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check every op against the march profile; exit 1 when some fall back to the CPU.

    Low-bit layers (`[quant] scheme`) are listed with their trained bits and how the march runs
    them. A recipe whose scheme has no integer form (lqnet) is checked without an export: each
    such layer is listed with the reason, and the exit code is 1 (not deployable)."""
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

    if recipe is not None and model is None and _not_deployable(recipe, march, overrides, json_out):
        raise typer.Exit(1)
    onnx_path, lr = resolve_onnx(recipe, model, overrides)
    profile = load_march(march_name(march, lr))
    report = check_model(onnx_path, profile)
    from hatcli.deploy.runtime import runtime_exactness

    exactness = runtime_exactness()
    if json_out:
        print_json({**report.to_dict(), "runtimes": exactness})
    else:
        low_bit = bool(report.low_bit_layers)
        table = Table("node", "module", "op", *(["trained"] if low_bit else []), "runs on", "reason")
        for row in report.rows:
            colour = "green" if row.status == "BPU" else "yellow"
            trained = [row.trained or "-"] if low_bit else []
            table.add_row(row.node, row.module or "-", row.op_type, *trained, f"[{colour}]{row.status}[/]",
                          row.reason)
        stdout.print(table)
        for verdict in report.low_bit_layers:
            colour = "green" if verdict.exact else "yellow"
            stdout.print(f"[{colour}]low-bit[/] {escape(verdict.layer.module)}: {escape(verdict.describe())}",
                         highlight=False)
        for record in report.bias_saturation:
            stdout.print(f"[yellow]saturated bias[/] {escape(record.describe())}", highlight=False)
        for record in report.accumulator_overflow:
            stdout.print(f"[yellow]accumulator[/] {escape(record.describe())}", highlight=False)
        for runtime in exactness:
            colour = "green" if runtime["exact"] else "yellow"
            where = "" if runtime["installed"] else f" (not installed here: {runtime['install']})"
            stdout.print(f"[{colour}]runtime[/] {escape(runtime['name'])}: {escape(runtime['note'])}{escape(where)}",
                         highlight=False, soft_wrap=True)
        verdict = "[green]supported[/]" if report.supported else f"[yellow]{report.fallbacks} ops fall back[/]"
        stdout.print(f"{onnx_path} on {profile.name}: {verdict}")
    if not report.supported:
        raise typer.Exit(1)


def _not_deployable(recipe: Path, march: str | None, overrides: list[str] | None, json_out: bool) -> bool:
    """Report the layers of a recipe whose scheme has no integer form (lqnet); False when none."""
    from hatcli.workflows.low_bit_reports import last_stage, not_integer_schemes, undeployable_layers

    lr = load(recipe, overrides)
    if not not_integer_schemes(lr):
        return False
    blocked = undeployable_layers(lr)
    if not blocked:
        return False  # the scheme is named, but no layer got it: the recipe converts
    name = march_name(march, lr)
    stage = last_stage(lr)
    command = f"hat eval {recipe} --stage {stage}"
    reasons = {b.layer.scheme: b.reason for b in blocked}
    if json_out:
        print_json({"recipe": str(recipe), "march": name, "deployable": False, "supported": False,
                    "stops_at": stage, "eval": command, "reasons": reasons,
                    "not_deployable": [b.to_dict() for b in blocked]})
        return True
    table = Table("module", "trained", "deploys")
    for b in blocked:
        table.add_row(escape(b.layer.module), escape(b.layer.describe()),
                      f"[red]no[/]: {escape(b.layer.scheme)} has no integer form")
    stdout.print(table)
    for scheme, reason in reasons.items():
        stdout.print(f"[red]{escape(scheme)}[/]: {escape(reason)}", highlight=False)
    stdout.print(f"{recipe} on {name}: [red]not deployable[/] ({len(blocked)} layers cannot be converted to "
                 f"an integer program); the recipe stops at `{escape(command)}`", highlight=False)
    return True


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
