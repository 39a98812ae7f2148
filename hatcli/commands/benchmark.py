"""`hat benchmark RECIPE`: every runtime and precision on this CPU in one table (accuracy, agreement
with the integer program, size, latency, FPS)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from hatcli.commands._options import JsonOpt, RecipeArg, SetOpt, aligned_lines, load, print_json
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat benchmark recipes/quickstart.toml

  hat benchmark recipes/quickstart.toml --threads 1 --batch 8 --json

  hat benchmark recipes/quickstart.toml --images 200 --rounds 3 --runs 10
"""


def benchmark(
    recipe: RecipeArg,
    batch: Annotated[int, typer.Option(min=1, help="Images per timed run.")] = 1,
    threads: Annotated[int | None, typer.Option(min=1, help="Threads of every runtime (default: torch's, all cores).",
                                                show_default=False)] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of turns: each row is timed once per round.")] = 5,
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per row per round.")] = 20,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs of each row first.")] = 5,
    images: Annotated[int | None, typer.Option(min=1, help="Validation images for accuracy and agreement "
                                                           "(default: all).", show_default=False)] = None,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """One row per runtime and precision: torch eager fp32, then each registered runtime's fp32 (the
    float model in ONNX) and int8 (the compiled artifact): status, file size, accuracy on the
    validation set, agreement with int_infer, median / p90 latency and FPS, timed in turns.

    Missing stages are built first, as `hat run` does. The table is also written to
    runs/<task>/benchmark/benchmark.json."""
    from hatcli.workflows.benchmark import benchmark as run_benchmark

    lr = load(recipe, overrides)
    result = run_benchmark(lr, batch=batch, threads=threads, rounds=rounds, runs=runs, warmup=warmup, images=images)
    if json_out:
        print_json(result)
        return
    _print(result)


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cells(result: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """The header, one row of strings per benchmark row, and the notes for rows that did not run.
    Output steps are shown for int8 rows only: a float model's distance from the integer program is
    not a matter of steps."""
    rows = result["rows"]
    metric = next((k for row in rows for k in row["metrics"]), "top1")
    same = next((title for key, title in (("same_detections", "same dets %"), ("pixel_agreement", "same pixels %"))
                 if any(key in row["agreement"] for row in rows)), "same top-1 %")
    header = ["format", "status", "MB", f"{metric} %", same, "max steps", "median ms", "p90 ms", "FPS"]
    lines, notes = [], []
    for row in rows:
        agreement = row["agreement"]
        share = agreement.get("same_detections", agreement.get("pixel_agreement", agreement.get("top1_agreement")))
        status = row["status"].split(":", 1)[0]
        if row["status"] != "ok":
            notes.append(f"{row['name']}: {row['status']}")
        steps = agreement.get("max_diff_steps") if row["precision"] == "int8" else None
        lines.append([row["name"], status, _cell(row["size_mb"], 2), _cell(row["metrics"].get(metric), 2),
                      _cell(share, 2), _cell(steps, 2), _cell(row["median_ms"]), _cell(row["p90_ms"]),
                      _cell(row["fps"], 1)])
    return header, lines, notes


def _print(result: dict) -> None:
    """The table (plain aligned lines where output is not a terminal), the notes, the machine."""
    header, lines, notes = _cells(result)
    title = (f"hat benchmark {result['recipe']}: {result['march']} artifact, batch {result['batch']}, "
             f"{result['threads']} threads, {result['reference']} as the reference")
    if stdout.is_terminal:
        table = Table(*header, title=title)
        for cells in lines:
            table.add_row(*cells[:1], cells[1] if cells[1] == "ok" else f"[yellow]{cells[1]}[/]", *cells[2:])
        stdout.print(table)
    else:
        for line in [title, *aligned_lines(header, lines)]:
            stdout.print(line, markup=False, highlight=False, soft_wrap=True)
    for note in notes:
        stdout.print(note, markup=False, highlight=False, soft_wrap=True)
    stdout.print(f"{result['cpu']}; accuracy and agreement on {result['images']} validation images; latency: "
                 f"median and p90 of {result['rounds']} x {result['runs_per_round']} runs per row, in turns",
                 markup=False, highlight=False, soft_wrap=True)
    if result["machine_busy"]:
        share = result.get("other_cpu_share")
        stdout.print("warning: other processes used the CPU during the timing"
                     + (f" ({share * 100:.0f} % of it)" if share is not None else "")
                     + "; the latencies are slower than this machine's, their ratios less so",
                     markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `hat benchmark` to the root app."""
    app.command("benchmark", epilog=EXAMPLES)(benchmark)
