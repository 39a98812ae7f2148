"""`hat debug RECIPE`: find the layer that lost the accuracy (runs/<task>/debug/debug.json)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from hatcli.commands._options import JsonOpt, RecipeArg, SetOpt, load, print_json
from hatcli.errors import UsageError
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat debug recipes/quickstart.toml                        # every stage the run has; quantization alone traced

  hat debug recipes/quickstart.toml --pair float,int_infer # QAT's weight changes and quantization together

  hat debug recipes/quickstart.toml --pair int_infer,deploy --images 16

  hat debug recipes/shapes_fcos.toml --stages float,calibration --pair float,calibration --worst 8

  hat debug recipes/quickstart.toml --cosine 0.995 --sqnr 20 --json
"""


def _stage_list(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UsageError(f"{option} takes stage names, comma-separated (e.g. float,int_infer); got `{text}`")
    return names


def debug(
    recipe: RecipeArg,
    stages: Annotated[str | None, typer.Option(help="Stages to compare with float, comma-separated "
                                                     "(default: every stage the run has of float, calibration, "
                                                     "qat, int_infer, deploy; qat_float is the QAT model's "
                                                     "weights computed in float).")] = None,
    pair: Annotated[str | None, typer.Option(help="The two stages whose divergence is traced, layer by layer "
                                                  "(default: quantization alone - qat_float,int_infer when QAT "
                                                  "ran, else float,int_infer).")] = None,
    images: Annotated[int, typer.Option(min=1, help="Val images to run (spread over the val set).")] = 64,
    cosine: Annotated[float, typer.Option(min=0.0, max=1.0, help="A layer below this cosine similarity diverges.")]
    = 0.99,
    sqnr: Annotated[float, typer.Option(help="A layer below this SQNR (dB) diverges.")] = 15.0,
    worst: Annotated[int, typer.Option(min=0, help="Images of most disagreement to draw with every stage's "
                                                   "prediction (0: none).")] = 4,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compare the stages of a run layer by layer on the same images and name the layer that lost
    the accuracy: the first layer where the pair diverges, the layers whose own quantization costs
    the outputs most (each taken alone from the quantized model), ranges against their grids, dead
    channels, saturated biases, the recipe rule behind each layer's quantization, and advice.
    Writes runs/<task>/debug/debug.json (shown by `hat report`) and drawings of the worst images."""
    from hatcli.workflows.debug import debug_run
    from hatcli.workflows.debug_findings import Thresholds

    two = _stage_list(pair, "--pair")
    if two is not None and len(two) != 2:
        raise UsageError(f"--pair takes two stages, e.g. --pair float,int_infer; got `{pair}`")
    result = debug_run(load(recipe, overrides), _stage_list(stages, "--stages"), (two[0], two[1]) if two else None,
                       images, worst, Thresholds(cosine=cosine, sqnr_db=sqnr))
    if json_out:
        print_json({"path": str(result.path), **result.data})
        return
    print_findings(result.data)
    stdout.print(f"[green]wrote[/] {result.path}", soft_wrap=True, highlight=False)


def print_findings(data: dict[str, Any]) -> None:
    """The headline of a debug run: the first divergence, the causes and the advice."""
    summary, first, verdict = data["summary"], data["first_divergence"], data["verdict"]
    stdout.print(f"{summary['pair']} on {summary['images']} images, {summary['layers']} layers "
                 f"({summary['thresholds']}); outputs {summary['output_sqnr_db']} dB SQNR, "
                 f"{summary['same_prediction_pct']} % same prediction", soft_wrap=True, highlight=False, markup=False)
    if first.get("layer"):
        found = [f"cosine {first['cosine']}, SQNR {first['sqnr_db']} dB", first["reading"], first["diagnosis"],
                 f"set by {first['rule']} ({first['where']})"]
        stdout.print(f"first divergence: {first['layer']} ({first['op']}, {first['dtype']}): "
                     + "; ".join(item for item in found if item and item != "-"),
                     soft_wrap=True, highlight=False, markup=False)
    else:
        stdout.print(f"first divergence: none ({first['note']})", soft_wrap=True, highlight=False, markup=False)
    table = Table("rank", "layer", "op", "dtype", "SQNR dB alone: at the layer", "at the outputs",
                  title="layers whose own error is largest (each taken alone from the quantized model)")
    for cause in data["causes"]:
        table.add_row(str(cause["rank"]), cause["layer"], cause["op"], cause["dtype"], str(cause["alone_sqnr_db"]),
                      str(cause["alone_output_sqnr_db"]))
    stdout.print(table)
    for cause in data["causes"]:
        if cause["diagnosis"] != "-":
            stdout.print(f"{cause['rank']}. {cause['layer']}: {cause['diagnosis']}", soft_wrap=True, highlight=False,
                         markup=False)
    for item in data["advice"]:
        stdout.print(f"advice: {item['layer']}: {item['do']}: {item['how']}", soft_wrap=True, highlight=False,
                     markup=False)
    stdout.print(f"[bold]loses the most:[/] {escape(verdict['finding'])}. {escape(verdict['agreement'])}.", soft_wrap=True,
                 highlight=False)
    if verdict["how"] != "-":
        stdout.print(f"[bold]do:[/] {escape(verdict['do'])}: {escape(verdict['how'])}", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    """Add `hat debug` to the root app."""
    app.command("debug", epilog=EXAMPLES)(debug)
