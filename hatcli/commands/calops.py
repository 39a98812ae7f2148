"""`hat calops RECIPE`: MACs, FLOPs and parameters, per layer."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from hatcli.commands._options import JsonOpt, RecipeArg, SetOpt, load, print_json
from hatcli.errors import UsageError
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat calops recipes/quickstart.toml

  hat calops recipes/quickstart.toml --input-shape 1,3,224,224 --json
"""


def parse_shape(text: str) -> list[int]:
    """Parse `1,3,224,224` into four positive ints."""
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 4 or any(v <= 0 for v in shape):
        raise UsageError(f"--input-shape must be N,C,H,W with positive ints, e.g. 1,3,224,224 (got `{text}`)")
    return shape


def calops(
    recipe: RecipeArg,
    input_shape: Annotated[str | None, typer.Option(help="N,C,H,W (default 1,3,<data.input_size>).")] = None,
    layers: Annotated[int, typer.Option(help="Rows of the per-layer table (0 = all).")] = 20,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Count MACs (FLOPs = 2 x MACs) and parameters of the recipe's float model, layer by layer."""
    import torch

    from hatcli.deploy.calops import count_ops

    lr = load(recipe, overrides)
    h, w = lr.recipe.data.input_size
    shape = parse_shape(input_shape) if input_shape else [1, 3, h, w]
    num_classes = getattr(lr.model, "num_classes", None) or 1000
    model = lr.family.build_deploy_model(lr.family.build_float_model(lr.model, num_classes)).eval()
    report = count_ops(model, torch.zeros(shape))
    if json_out:
        print_json(report.to_dict())
        return
    table = Table("layer", "type", "MACs", "params", "output")
    rows = sorted(report.layers, key=lambda r: -r.macs)
    for row in rows[: layers or None]:
        table.add_row(row.name, row.type, f"{row.macs:,}", f"{row.params:,}", str(row.output_shape))
    stdout.print(table)
    stdout.print(f"input {shape}: [bold]{report.macs / 1e9:.3f} G MACs[/] "
                 f"({report.flops / 1e9:.3f} GFLOPs = 2 x MACs), {report.params / 1e6:.3f} M parameters")


def register(app: typer.Typer) -> None:
    """Add `hat calops` to the root app."""
    app.command("calops", epilog=EXAMPLES)(calops)
