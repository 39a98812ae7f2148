"""`hat run RECIPE`: the whole chain from data to a measured, deployable artifact."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from hatcli.commands._options import JsonOpt, RecipeArg, SetOpt, load, print_json
from hatcli.errors import Interrupted
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat run recipes/quickstart.toml

  hat run recipes/quickstart.toml --set float.epochs=2 --force
"""


def run(
    recipe: RecipeArg,
    force: Annotated[bool, typer.Option(help="Re-run every stage even when its outputs are up to date.")] = False,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Pack, train float, calibrate, QAT, evaluate the integer model, export, check, compile, perf,
    then write runs/<task>/summary.json and the run report runs/<task>/report.html (`hat report`).

    Stages that are up to date are reused; one that an interrupted run left unfinished resumes.
    """
    from hatcli.workflows.pipeline import run_pipeline
    from hatcli.workflows.report import report_path

    lr = load(recipe, overrides)
    try:
        rows = run_pipeline(lr, force=force)
    except Interrupted as exc:  # a training stage saved its progress: say how `hat run` goes on
        again = "run the same command without --force" if force else "run the same command"
        exc.hint = f"{again} to continue (`hat run` resumes the unfinished stage from its last checkpoint)"
        raise
    if json_out:
        print_json([asdict(r) for r in rows])
        return
    table = Table("stage", "result", "time", title=f"hat run {recipe}")
    for row in rows:
        seconds = "reused" if row.reused else f"{row.seconds:.1f}s"
        table.add_row(row.stage, row.metric, seconds)
    stdout.print(table)
    stdout.print("[bold]artifacts[/]")
    for row in rows:
        for path in row.artifacts:
            stdout.print(f"  {row.stage:<22} {path}", soft_wrap=True, highlight=False)
    page = report_path(lr)
    if page.is_file():
        stdout.print(f"  {'report':<22} {page}", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    """Add `hat run` to the root app."""
    app.command("run", epilog=EXAMPLES)(run)
