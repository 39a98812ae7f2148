"""`hat perf`: estimated latency on a march, and latency measured on this host."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hatcli.commands._options import JsonOpt, print_json
from hatcli.errors import UsageError
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat perf runs/quickstart/compile/nash_e-O3

  hat perf model.onnx --march bayes --no-measure --json

  hat perf model.onnx --march host --batch 8 --threads 2
"""


def perf(
    target: Annotated[Path, typer.Argument(help="Artifact folder or ONNX file.", metavar="ARTIFACT|MODEL.onnx")],
    march: Annotated[str | None, typer.Option(help="March to estimate for (default: the artifact's, else host).")] = None,
    measure: Annotated[bool | None, typer.Option("--measure/--no-measure", help="Also time it on this host (default: on).")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch size.")] = 1,
    threads: Annotated[int | None, typer.Option(min=1, help="ONNX Runtime intra-op threads.")] = None,
    runs: Annotated[int, typer.Option(min=1, help="Timed runs after warm-up.")] = 50,
    layers: Annotated[int, typer.Option(min=0, help="How many of the slowest layers to list (0: none).")] = 10,
    json_out: JsonOpt = False,
) -> None:
    """Estimate latency/FPS on a march from a per-layer cost model; measure it here with ONNX Runtime."""
    import json

    from hatcli.deploy.recipe_build import estimation_source, perf_report
    from hatcli.quant.march import load_march

    if march is not None:
        load_march(march)  # a bad --march is reported before anything is read
    if target.is_dir():
        manifest_path = target / "manifest.json"
        if not manifest_path.exists():
            raise UsageError(f"{target} is not an artifact folder (no manifest.json)")
        from hatcli.deploy.runtime import load_artifact

        artifact = load_artifact(target)  # refuses a tampered artifact before timing it
        march = march or json.loads(manifest_path.read_text()).get("march")
        model_path, source = artifact.model_path, estimation_source(target)
    elif target.is_file():
        model_path = source = target
    else:
        raise UsageError(f"no such artifact or model: {target}")
    march = march or "host"
    report = perf_report(model_path, march, measure=True if measure is None else measure, batch=batch,
                         threads=threads, runs=runs, estimate_from=source)
    if json_out:
        print_json(report)
        return
    est = report["estimate"]
    table = Table("where", "latency (ms)", "FPS", "how")
    table.add_row(est["chip"] if est["estimated"] else "this host", f"{est['latency_ms']:.3f}", f"{est['fps']:.1f}",
                  "estimated (cost model)" if est["estimated"] else "cost model of this host")
    if "measured" in report:
        m = report["measured"]
        table.add_row("this host (ONNX Runtime)", f"{m['median_ms']:.3f} (p90 {m['p90_ms']:.3f})", f"{m['fps']:.1f}",
                      f"measured, median of {m['runs']} runs")
    stdout.print(table)
    if layers:
        stdout.print(_slowest_layers(est, layers))
    stdout.print(f"MACs/frame {est['total_macs'] // max(1, batch):,}; DDR bytes/frame {est['ddr_bytes_per_frame']:,}")


def _slowest_layers(estimate: dict, count: int) -> Table:
    """The `count` layers with the largest estimated time: module path beside the ONNX node."""
    slowest = sorted(estimate["layers"], key=lambda layer: -layer["time_us"])[:count]
    word = "estimated " if estimate["estimated"] else ""
    table = Table("module", "node", "op", f"{word}time (us)", "% of time", "bound",
                  title=f"slowest {len(slowest)} of {len(estimate['layers'])} layers")
    for layer in slowest:
        table.add_row(layer.get("module") or "-", layer["name"], layer["op_type"], f"{layer['time_us']:.2f}",
                      f"{layer['percent']:.2f}", layer["bound"] + (" (CPU fallback)" if layer.get("fallback") else ""))
    return table


def register(app: typer.Typer) -> None:
    """Add `hat perf` to the root app."""
    app.command("perf", epilog=EXAMPLES)(perf)
