"""`hat recipe show|validate RECIPE`: the resolved recipe (extends merged, overrides applied)."""

from __future__ import annotations

import typer

from hatcli.commands._options import RecipeArg, SetOpt, load
from hatcli.progress import stdout

app = typer.Typer(help="Inspect recipes.", no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]})


@app.command("show", epilog="Example:\n\n  hat recipe show recipes/quickstart.toml --set float.epochs=1")
def show(recipe: RecipeArg, overrides: SetOpt = None) -> None:
    """Print the resolved recipe as TOML (what a stage saves next to its outputs)."""
    typer.echo(load(recipe, overrides).to_toml(), nl=False)


@app.command("validate", epilog="Example:\n\n  hat recipe validate recipes/quickstart.toml")
def validate(recipe: RecipeArg, overrides: SetOpt = None) -> None:
    """Check a recipe against the schema; exit 2 with the failing key when it is wrong."""
    lr = load(recipe, overrides)
    stdout.print(f"[green]valid[/]: {recipe} (family {lr.family.name}, sha256 {lr.sha256[:12]})")
