"""`hat report RECIPE`: the whole run as one self-contained HTML page (runs/<task>/report.html)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hatcli.commands._options import JsonOpt, RecipeArg, SetOpt, load, print_json
from hatcli.errors import UsageError
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat report recipes/quickstart.toml                   # -> runs/quickstart/report.html

  hat report recipes/quickstart.toml --out /tmp/quickstart.html --images 0

  hat report recipes/quickstart.toml --json
"""


def report(
    recipe: RecipeArg,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the page "
                                                                 "(default: runs/<task>/report.html).")] = None,
    images: Annotated[int, typer.Option(min=0, help="Validation images to draw the last stage's predictions on "
                                                    "(0: none).")] = 6,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write one HTML page of the run: stage table, training curves, quantization summary,
    per-layer latency with the estimate's error, drawn predictions, debug findings, the resolved
    recipe and versions. It has no scripts and fetches nothing: it opens offline or as an
    attachment. Stages that have not run are named with the command that runs them."""
    from hatcli.workflows.report import write_report

    if out is not None and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give the file to write, e.g. {out / 'report.html'}")
    result = write_report(load(recipe, overrides), out, images)
    if json_out:
        print_json(result.to_dict())
        return
    stdout.print(f"[green]wrote[/] {result.path} ({result.bytes / 1e3:.0f} kB)", soft_wrap=True, highlight=False)
    for section, why in result.missing.items():
        stdout.print(f"  {section}: {why}", soft_wrap=True, highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add `hat report` to the root app."""
    app.command("report", epilog=EXAMPLES)(report)
