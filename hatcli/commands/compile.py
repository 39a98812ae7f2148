"""`hat compile`: a deployable artifact folder for a march at an optimization level."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hatcli.commands._options import JsonOpt, SetOpt, print_json
from hatcli.commands._targets import march_name, resolve_onnx
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat compile recipes/quickstart.toml --march nash_e --opt 3

  hat compile --model model.onnx --march host --opt 0 --out build/host-O0
"""


def compile_cmd(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe (compiles its exported model).", metavar="[RECIPE]")] = None,
    model: Annotated[Path | None, typer.Option(help="An ONNX file to compile instead of a recipe's export.")] = None,
    march: Annotated[str | None, typer.Option(help="A march (`hat march list`) or a profile .toml (default: the recipe's).")] = None,
    opt: Annotated[int | None, typer.Option(help="Optimization level 0 (none) .. 3 (all); default: the recipe's.")] = None,
    out: Annotated[Path | None, typer.Option(help="Artifact folder (default runs/<task>/compile/<march>-O<opt>).")] = None,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Optimize the model offline and write model.onnx, manifest.json and perf.json."""
    from hatcli.deploy.compile import compile_model
    from hatcli.deploy.recipe_build import compile_recipe
    from hatcli.errors import UsageError
    from hatcli.quant.march import load_march
    from hatcli.stages import default_compile_dir

    if march is not None:  # bad arguments are reported before the model is looked for
        load_march(march)
    if opt is not None and opt not in (0, 1, 2, 3):
        raise UsageError(f"--opt must be 0..3, not {opt}")
    if model is not None and out is None:
        raise UsageError("--out DIR is required with --model")
    onnx_path, lr = resolve_onnx(recipe, model, overrides)
    name = march_name(march, lr)
    load_march(name)
    level = opt if opt is not None else (lr.recipe.deploy.opt if lr is not None else 3)
    if lr is not None:
        folder = compile_recipe(lr, name, level, out or default_compile_dir(lr, name, level))
    else:
        spec = {"name": "input", "shape": None}
        folder = compile_model(onnx_path, load_march(name), level, out, spec)
    if json_out:
        print_json({"artifact": str(folder), "march": name, "opt": level})
    else:
        stdout.print(f"[green]compiled[/] {onnx_path} for {name} at -O{level} -> {folder}")


def register(app: typer.Typer) -> None:
    """Add `hat compile` to the root app."""
    app.command("compile", epilog=EXAMPLES)(compile_cmd)
