"""`hat calops RECIPE`: MACs, FLOPs, parameters, bit-operations and weight memory, per layer."""

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
    parameters of the recipe's deploy model, layer by layer; and, at the bits each layer trains
    with (`[quant] scheme`, the march's int8 elsewhere), bit-operations (BOPs = MACs x weight bits
    x activation bits) and weight memory (weights x weight bits / 8), beside the int8 and fp32
    figures of the same network."""
    import torch

    from hatcli.deploy.calops import apply_bits, count_graph_ops, count_ops, weight_elements
    from hatcli.workflows.low_bit_reports import num_classes, planned_low_bit_layers

    lr = load(recipe, overrides)
    if stage not in ("float", "int_infer"):
        raise UsageError(f"--stage must be float or int_infer (got `{stage}`)")
    h, w = lr.recipe.data.input_size
    shape = parse_shape(input_shape) if input_shape else [1, 3, h, w]
    float_model = lr.family.build_float_model(lr.model, num_classes(lr))
    model = lr.family.build_deploy_model(float_model).eval()
    if stage == "float":
        report = count_ops(model, torch.zeros(shape))
        low_bit = planned_low_bit_layers(lr, float_model)  # the plan resolved on the graph: no checkpoint
    else:
        from hatcli.workflows.stage_models import integer_model
        from hatcli.quant.integer import integer_program
        from hatcli.quant.low_bit_records import low_bit_layers

        reference, _ = integer_model(lr)
        own = {name: sum(p.numel() for p in module.parameters(recurse=False)) for name, module in model.named_modules()}
        weights = {name: weight_elements(module) for name, module in model.named_modules()}
        report = count_graph_ops(integer_program(reference), torch.zeros(shape),
                                 params=sum(p.numel() for p in model.parameters()), module_params=own,
                                 module_weights=weights)
        low_bit = low_bit_layers(reference)
    apply_bits(report, low_bit)
    if json_out:
        print_json({"stage": stage, **report.to_dict()})
        return
    table = Table("layer", "type", "bits", "MACs", "BOPs", "params", "weight bytes", "output")
    rows = sorted(report.layers, key=lambda r: -r.macs)
    for row in rows[: layers or None]:
        table.add_row(row.name, row.type, _bits(row), f"{row.macs:,}", f"{row.bops:,}", f"{row.params:,}",
                      f"{row.weight_bytes:,g}" if row.weights else "-", str(row.output_shape))
    stdout.print(table)
    stdout.print(f"{stage}, input {shape}: [bold]{report.macs / 1e9:.3f} G MACs[/] "
                 f"({report.flops / 1e9:.3f} GFLOPs = 2 x MACs), {report.params / 1e6:.3f} M parameters")
    ratios = report.ratios()
    trained = (f"at the trained bits ({report.low_bit_layers} low-bit layers, the rest int8)"
               if report.low_bit_layers else "at int8 (the march's scheme)")
    stdout.print(f"BOPs {trained}: [bold]{report.bops / 1e9:.4f} G[/] "
                 f"(int8 {report.bops_int8 / 1e9:.4f} G, fp32 {report.bops_fp32 / 1e9:.4f} G: "
                 f"{_times(ratios['bops_vs_int8'])} / {_times(ratios['bops_vs_fp32'])} fewer)", highlight=False)
    stdout.print(f"weight memory {trained}: [bold]{_bytes(report.weight_bytes)}[/] "
                 f"(int8 {_bytes(report.weight_bytes_int8)}, fp32 {_bytes(report.weight_bytes_fp32)}: "
                 f"{_times(ratios['weight_memory_vs_int8'])} / {_times(ratios['weight_memory_vs_fp32'])} smaller; "
                 "scales and int32 biases not included)", highlight=False)


def _bits(row) -> str:
    if row.weight_bits is None:
        return "-"
    if row.scheme == "march":
        return "int8"
    return f"{row.scheme} W{row.weight_bits}A{row.activation_bits}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _bytes(value: float) -> str:
    if value >= 2 ** 20:
        return f"{value / 2 ** 20:.2f} MiB"
    if value >= 2 ** 10:
        return f"{value / 2 ** 10:.2f} KiB"
    return f"{value:g} B"


def register(app: typer.Typer) -> None:
    """Add `hat calops` to the root app."""
    app.command("calops", epilog=EXAMPLES)(calops)
