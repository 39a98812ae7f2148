"""`hat train RECIPE --stage calibration --auto-int16`: check the options, run the search, print its table.

The search itself (`hatcli.workflows.auto_int16`) is imported when it runs, so that `hat --help`
stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from hatcli.commands._options import print_json
from hatcli.errors import UsageError
from hatcli.progress import console, stdout

if TYPE_CHECKING:
    from hatcli.recipe import LoadedRecipe
    from hatcli.workflows.auto_int16 import AutoInt16Result, Int16Step

DEFAULT_MAX_DROP = 0.5
"""Points of the primary metric PTQ may lose against float when `--max-drop` is not given."""


def run_auto_int16(recipe: Path, lr: LoadedRecipe, stage: str, auto_int16: bool, max_drop: float | None,
                   write_recipe: Path | None, sensitivity_batches: int | None, from_path: Path | None,
                   overrides: list[str] | None, json_out: bool, nproc_per_node: int, nnodes: str) -> None:
    """`--stage calibration --auto-int16`: the search, its summary table (or JSON), exit 1 when it falls short."""
    from hatcli.engine import distributed
    from hatcli.workflows.auto_int16 import auto_int16 as search
    from hatcli.workflows.auto_int16 import check_march

    if not auto_int16:
        raise UsageError("--max-drop, --write-recipe and --sensitivity-batches apply to --auto-int16")
    if stage != "calibration":
        raise UsageError("--auto-int16 applies to --stage calibration")
    if nproc_per_node > 1 or nnodes != "1":
        raise UsageError("--auto-int16 runs in one process; drop --nproc-per-node / --nnodes")
    check_march(lr.recipe.quant.march)
    limit = DEFAULT_MAX_DROP if max_drop is None else max_drop
    distributed.init_from_env(getattr(lr.recipe, "device", "auto"))
    result = search(recipe, overrides, limit, output=write_recipe, from_path=from_path,
                    sensitivity_batches=sensitivity_batches, on_step=_print_step)
    if json_out:
        print_json(result.to_dict())
    else:
        print_result(result)
    if not result.met:
        console.print(f"[yellow]no int16 set reached a drop of {result.max_drop:g} or less; kept the smallest "
                      f"drop ({result.steps[result.chosen].drop:.2f})[/]")
        raise typer.Exit(1)


def _print_step(step: Int16Step) -> None:
    what = "as given" if step.step == 0 else "+ " + ", ".join(step.added)
    console.print(f"int16 step {step.step} ({what}): PTQ {step.ptq:.2f}, drop {step.drop:.2f}")


def print_result(result: AutoInt16Result) -> None:
    """The steps tried (the kept one starred) and where the recipe for the kept set was written."""
    table = Table("step", "layers in int16", "added", f"PTQ {result.metric}", "drop",
                  title=f"float {result.metric} {result.float_metric:.2f}, max drop {result.max_drop:g}")
    for i, step in enumerate(result.steps):
        mark = " *" if i == result.chosen else ""
        colour = "green" if step.drop <= result.max_drop else "yellow"
        table.add_row(f"{step.step}{mark}", str(len(step.int16)), ", ".join(step.added) or "-",
                      f"{step.ptq:.2f}", f"[{colour}]{step.drop:.2f}[/]")
    stdout.print(table)
    if result.calibration_up_to_date:
        stdout.print(f"wrote {result.written} (* kept); its calibration stage is up to date: "
                     f"`hat run {result.written}` goes on from there")
    else:
        stdout.print(f"wrote {result.written} (* kept); its calibration stage is not up to date "
                     f"(`hat run` will calibrate it again)")
