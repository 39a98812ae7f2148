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

  hat calops recipes/quickstart.toml --stage int_infer     # the integer program (needs its checkpoint)

  hat calops recipes/fcos.toml --input-shape 1,3,1024,1024  # counted on meta tensors: no compute
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
    stage: Annotated[str, typer.Option(help="float (the network, no checkpoint needed) or int_infer "
                                            "(the integer program converted from the QAT/calibration checkpoint).")] = "float",
    layers: Annotated[int, typer.Option(help="Rows of the per-layer table (0 = all).")] = 20,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Count MACs (FLOPs = 2 x MACs, counted by torch's FlopCounterMode on conv / matmul) and
    parameters of the recipe's deploy model, layer by layer."""
    import torch

    from hatcli.deploy.calops import count_graph_ops, count_ops

    lr = load(recipe, overrides)
    if stage not in ("float", "int_infer"):
        raise UsageError(f"--stage must be float or int_infer (got `{stage}`)")
    h, w = lr.recipe.data.input_size
    shape = parse_shape(input_shape) if input_shape else [1, 3, h, w]
    model = lr.family.build_deploy_model(lr.family.build_float_model(lr.model, _num_classes(lr))).eval()
    if stage == "float":
        report = count_ops(model, torch.zeros(shape))
    else:
        from hatcli.workflows.stage_models import integer_model
        from hatcli.quant.integer import integer_program

        reference, _ = integer_model(lr)
        own = {name: sum(p.numel() for p in module.parameters(recurse=False)) for name, module in model.named_modules()}
        report = count_graph_ops(integer_program(reference), torch.zeros(shape),
                                 params=sum(p.numel() for p in model.parameters()), module_params=own)
    if json_out:
        print_json({"stage": stage, **report.to_dict()})
        return
    table = Table("layer", "type", "MACs", "params", "output")
    rows = sorted(report.layers, key=lambda r: -r.macs)
    for row in rows[: layers or None]:
        table.add_row(row.name, row.type, f"{row.macs:,}", f"{row.params:,}", str(row.output_shape))
    stdout.print(table)
    stdout.print(f"{stage}, input {shape}: [bold]{report.macs / 1e9:.3f} G MACs[/] "
                 f"({report.flops / 1e9:.3f} GFLOPs = 2 x MACs), {report.params / 1e6:.3f} M parameters")


def _num_classes(lr) -> int:
    """The model's class count: `model.num_classes`, else the packed training data's, else 1000
    (classification) or 80 (detection), the ImageNet / COCO counts."""
    wanted = lr.model.num_classes
    if wanted:
        return int(wanted)
    from hatcli.data.lmdb_format import open_packed
    from hatcli.inputs import data_path

    path = data_path(lr, "train")
    if path.exists():
        try:
            return len(open_packed(path).meta["classes"])
        except Exception:  # noqa: BLE001 - unreadable data: fall back to the standard count
            pass
    return 80 if lr.family.task == "detection" else 1000


def register(app: typer.Typer) -> None:
    """Add `hat calops` to the root app."""
    app.command("calops", epilog=EXAMPLES)(calops)
