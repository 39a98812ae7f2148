"""`hat check`: can a march run every op of the model on its accelerator? What falls back?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hatcli.commands._options import JsonOpt, SetOpt, load, print_json
from hatcli.commands._targets import march_name, resolve_onnx
from hatcli.errors import UsageError
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat check recipes/quickstart.toml --march nash_e

  hat check --model model.onnx --march bayes --json

  hat check --list-marches

  hat check --list-marches --march nash_e      # rules, ops and their limits

  hat check recipes/quickstart.toml --sensitivity --batches 4

  hat check recipes/quickstart.toml --sensitivity --json
"""


def check(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe (checks its exported model).", metavar="[RECIPE]")] = None,
    model: Annotated[Path | None, typer.Option(help="An ONNX file to check instead of a recipe's export.")] = None,
    march: Annotated[str | None, typer.Option(help="bayes, nash_e, nash_m, nash_p or host (default: the recipe's).")] = None,
    list_marches: Annotated[bool, typer.Option("--list-marches", help="Show every march profile and exit.")] = False,
    sensitivity: Annotated[bool, typer.Option("--sensitivity", help="Rank quantized layers by what quantizing each "
                                              "alone costs (needs the calibration stage).")] = False,
    batches: Annotated[int | None, typer.Option(min=1, help="With --sensitivity: val batches to use "
                                                         "(default all).")] = None,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check every op against the march profile; exit 1 when some fall back to the CPU.

    With --sensitivity: rank the recipe's quantized layers by what quantizing each alone costs.
    """
    from hatcli.quant.march import list_marches as all_marches
    from hatcli.quant.march import load_march

    profile = load_march(march) if march is not None else None  # a bad --march is reported first
    if list_marches:
        if profile is not None:
            _show_march(profile, json_out)
            return
        profiles = all_marches()
        if json_out:
            print_json([p.model_dump() for p in profiles])
            return
        table = Table("march", "chip", "int8 TOPS", "activations", "float output", "latency")
        for p in profiles:
            table.add_row(p.name, p.chip, f"{p.int8_tops:g}", "/".join(p.quant.activation_dtypes),
                          "yes" if p.quant.float_output else "no (int32, dequantized)",
                          "estimated" if p.estimated else "measured")
        stdout.print(table)
        return
    if sensitivity:
        _sensitivity(recipe, model, march, batches, overrides, json_out)
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
        verdict = "[green]supported[/]" if report.supported else f"[yellow]{report.fallbacks} ops fall back[/]"
        stdout.print(f"{onnx_path} on {profile.name}: {verdict}")
    if not report.supported:
        raise typer.Exit(1)


def _sensitivity(recipe: Path | None, model: Path | None, march: str | None, batches: int | None,
                 overrides: list[str] | None, json_out: bool) -> None:
    """`hat check RECIPE --sensitivity`: the ranked table (or JSON) of per-layer quantization cost."""
    from hatcli.quant.sensitivity import layer_sensitivity

    if recipe is None or model is not None:
        raise UsageError("--sensitivity needs a RECIPE (not --model): it measures the recipe's calibrated model")
    lr = load(recipe, overrides)
    if march and march != lr.recipe.quant.march:
        raise UsageError(f"--sensitivity uses the recipe's march (`{lr.recipe.quant.march}`) and calibration; "
                         f"to try `{march}`, use --set quant.march={march} and calibrate again")
    report = layer_sensitivity(lr, batches)
    if json_out:
        print_json(report.to_dict())
        return
    table = Table("rank", "layer", "op", "dtype", f"drop ({report.metric})", "SQNR dB",
                  title=f"quantizing one layer alone, {report.images} val images")
    for i, row in enumerate(report.layers, start=1):
        colour = "red" if row.drop > 0 else "green" if row.drop < 0 else "default"
        table.add_row(str(i), row.layer, row.op, row.dtype, f"[{colour}]{row.drop:+.2f}[/]", f"{row.sqnr_db:.1f}")
    stdout.print(table)
    stdout.print(f"reference (every fake quant off): {report.metric} {report.reference:.2f}")


def _show_march(profile, json_out: bool) -> None:
    """Print one march's quantization rules and its supported ops with their limits."""
    if json_out:
        print_json(profile.model_dump())
        return
    rules = profile.quant
    stdout.print(f"[bold]{profile.name}[/] ({profile.chip}): {profile.int8_tops:g} int8 TOPS, latency "
                 f"{'estimated' if profile.estimated else 'measured'}")
    stdout.print(f"  activations {'/'.join(rules.activation_dtypes)} per tensor, zero point 0; weights "
                 f"{rules.weight_dtype} symmetric per output channel; float output: "
                 f"{'yes' if rules.float_output else 'no (the last conv gives int32, then dequantized)'}; "
                 f"unsigned grid after ReLU: {'yes' if rules.unsigned_after_relu else 'no'}")
    table = Table("op", "max kernel", "max stride", "group channels multiple of", "note")
    for name, rule in sorted(profile.ops.items()):
        table.add_row(name, *(str(v) if v is not None else "-" for v in
                              (rule.max_kernel, rule.max_stride, rule.group_channel_multiple)), rule.note)
    stdout.print(table)
    stdout.print(f"  fused after conv / matmul / add: {', '.join(profile.fusible_activations)}")


def register(app: typer.Typer) -> None:
    """Add `hat check` to the root app."""
    app.command("check", epilog=EXAMPLES)(check)
