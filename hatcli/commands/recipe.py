"""`hat recipe show|validate RECIPE`: the resolved recipe (extends merged, overrides applied)."""

from __future__ import annotations

import typer

from hatcli.commands._options import JsonOpt, RecipeArg, SetOpt, load, print_json
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat recipe validate recipes/quickstart.toml

  hat recipe validate recipes/quickstart.toml --set quant.march=nash_m --json

  hat recipe show recipes/quickstart.toml --set float.epochs=1

  hat recipe show recipes/quickstart.toml --json
"""

app = typer.Typer(help="Inspect recipes: check one, or print it fully resolved.", no_args_is_help=True,
                  epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})


@app.command("show", epilog=EXAMPLES)
def show(recipe: RecipeArg, overrides: SetOpt = None, json: JsonOpt = False) -> None:
    """Print the resolved recipe as TOML (what a stage saves next to its outputs), or as JSON."""
    loaded = load(recipe, overrides)
    if json:
        print_json(loaded.resolved)
    else:
        typer.echo(loaded.to_toml(), nl=False)


@app.command("validate", epilog=EXAMPLES)
def validate(recipe: RecipeArg, overrides: SetOpt = None, json: JsonOpt = False) -> None:
    """Check a recipe whole (schema, types, march, transforms, callbacks); exit 2 naming the failing key."""
    loaded = load(recipe, overrides)
    if json:
        print_json({"valid": True, "recipe": str(recipe), "family": loaded.family.name, "sha256": loaded.sha256})
    else:
        stdout.print(f"[green]valid[/]: {recipe} (family {loaded.family.name}, sha256 {loaded.sha256[:12]})",
                     soft_wrap=True)
