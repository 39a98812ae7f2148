"""`hat perf`: estimated latency on a march, and latency measured on this host."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hatcli.commands._options import JsonOpt, RuntimeOpt, print_json
from hatcli.errors import UsageError
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat perf runs/quickstart/compile/nash_e-O3

  hat perf model.onnx --march bayes --no-measure --json

  hat perf model.onnx --march host --batch 8 --threads 2

  hat perf runs/quickstart/compile/host-O3 --runtime openvino

  hat perf --fit board.csv --march nash_e --out my_nash_e.toml   # calibrate on your own board
"""


def perf(
    target: Annotated[Path | None, typer.Argument(help="Artifact folder or ONNX file.", metavar="ARTIFACT|MODEL.onnx",
                                                  show_default=False)] = None,
    march: Annotated[str | None, typer.Option(help="March to estimate for (default: the artifact's, else host).")] = None,
    measure: Annotated[bool | None, typer.Option("--measure/--no-measure", help="Also time it on this host (default: on).")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch size.")] = 1,
    threads: Annotated[int | None, typer.Option(min=1, help="The runtime's intra-op threads.")] = None,
    runs: Annotated[int, typer.Option(min=1, help="Timed runs after warm-up.")] = 50,
    layers: Annotated[int, typer.Option(min=0, help="How many of the slowest layers to list (0: none).")] = 10,
    fit: Annotated[Path | None, typer.Option(help="Fit --march's latency model to a CSV of your board's measurements "
                                                  "(model,latency_ms[,fps,threads,family]) and write a profile.",
                                             metavar="CSV")] = None,
    out: Annotated[Path | None, typer.Option(help="With --fit: the profile to write (e.g. my_nash_e.toml).")] = None,
    runtime: RuntimeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Estimate latency/FPS on a march from a per-layer cost model; measure it here with a runtime
    (ONNX Runtime unless --runtime names another).

    With --fit, calibrate the march's latency model on models you measured on a board instead: the
    new profile works wherever a march does (`--march my_nash_e.toml`, `[quant] march = ...`)."""
    import json

    if fit is not None:
        _fit(fit, march, out, target, json_out)
        return
    if target is None:
        raise UsageError("give an ARTIFACT folder or MODEL.onnx (or --fit CSV --march M --out FILE)")

    from hatcli.deploy.perf import error_phrase, estimate_error_text
    from hatcli.deploy.recipe_build import estimation_source, perf_report
    from hatcli.quant.march import load_march

    if march is not None:
        load_march(march)  # a bad --march is reported before anything is read
    if target.is_dir():
        manifest_path = target / "manifest.json"
        if not manifest_path.exists():
            raise UsageError(f"{target} is not an artifact folder (no manifest.json)")
        from hatcli.deploy.runtime import load_artifact

        artifact = load_artifact(target, runtime=runtime)  # refuses a tampered artifact before timing it
        march = march or artifact_march(target, json.loads(manifest_path.read_text()))
        model_path, source = artifact.model_path, estimation_source(target)
    elif target.is_file():
        model_path = source = target
    else:
        raise UsageError(f"no such artifact or model: {target}")
    march = march or "host"
    report = perf_report(model_path, march, measure=True if measure is None else measure, batch=batch,
                         threads=threads, runs=runs, estimate_from=source, runtime=runtime)
    if json_out:
        print_json(report)
        return
    est = report["estimate"]
    table = Table("where", "latency (ms)", "FPS", "how")
    how = "estimated (cost model)" if est["estimated"] else "cost model of this host"
    if est.get("error"):
        how = f"estimated: {error_phrase(est['error'])}" + (" (EXTRAPOLATED)" if est.get("extrapolated") else "")
    table.add_row(est["chip"] if est["estimated"] else "this host", f"{est['latency_ms']:.3f}", f"{est['fps']:.1f}", how)
    if est.get("load_fps"):
        table.add_row(f"{est['chip']}, {est['load_threads']} threads", "-", f"{est['load_fps']:.1f}",
                      _load_how(est))
    if "measured" in report:
        m = report["measured"]
        where = "this host (ONNX Runtime)" if m.get("runtime", "onnxruntime") == "onnxruntime" else f"this host ({m['runtime']})"
        table.add_row(where, f"{m['median_ms']:.3f} (p90 {m['p90_ms']:.3f})", f"{m['fps']:.1f}",
                      f"measured, median of {m['runs']} runs")
    stdout.print(table)
    if layers:
        stdout.print(_slowest_layers(est, layers))
    stdout.print(f"MACs/frame {est['total_macs'] // max(1, batch):,}; DDR bytes/frame {est['ddr_bytes_per_frame']:,}")
    error_note = estimate_error_text(est.get("error"), est["chip"],
                                     est.get("extrapolation", []) if est.get("extrapolated") else [])
    for note in est.get("notes", []):
        if note == error_note or "extrapolated" in note:
            stdout.print(note)


def artifact_march(artifact_dir: Path, manifest: dict) -> str | None:
    """The march to estimate an artifact on: its manifest's march where that march is installed,
    else the profile the artifact was compiled for (`march.toml`, e.g. a profile file or a plugin
    that is not installed here); None when the manifest names no march."""
    from hatcli.quant.march import march_names

    name = manifest.get("march")
    stored = artifact_dir / manifest.get("march_profile", "march.toml")
    if name is None or name in march_names() or not stored.is_file():
        return name
    from hatcli.progress import print_line

    print_line(f"march `{name}` is not installed here: estimating with the profile the artifact was "
               f"compiled for ({stored})")
    return str(stored)


def _load_how(estimate: dict) -> str:
    """How the under-load FPS was estimated, with its error where known."""
    from hatcli.deploy.perf import error_phrase

    error = estimate.get("load_error")
    return f"estimated: {error_phrase(error)}" if error else "estimated"


def _fit(csv_path: Path, march: str | None, out: Path | None, target: Path | None, json_out: bool) -> None:
    """`hat perf --fit`: fit, write the profile, print the cross-validated error."""
    from hatcli.deploy.perf_refit import refit_march
    from hatcli.quant.march import load_march

    if target is not None:
        raise UsageError("--fit takes no ARTIFACT|MODEL argument (the CSV names the models)")
    if march is None or out is None:
        raise UsageError("--fit needs --march (the profile to start from) and --out (the profile to write)")
    if out.suffix != ".toml":
        raise UsageError(f"--out {out}: a march profile is a .toml file")
    profile, report = refit_march(csv_path, load_march(march), out)
    fitted = profile.cost.fitted
    if json_out:
        print_json({"profile": str(out), "march": profile.name, "channel_alignment": report.channel_alignment,
                    "input_alignment": report.input_alignment,
                    "latency_error": report.latency_error, "load_error": report.load_error,
                    "by_family": report.by_family(), "coefficients": fitted.latency_ms if fitted else {}})
        return
    e = report.latency_error
    stdout.print(f"[green]wrote[/] {out} (march `{profile.name}`, from {march}): single-frame latency, "
                 f"leave-one-family-out over {e['rows']} models: median error {100 * e['median_abs_error']:.1f} %, "
                 f"{100 * e['within_10']:.0f} % within +-10 %, {100 * e['within_25']:.0f} % within +-25 %, "
                 f"Spearman {e['spearman']:.3f}")
    table = Table("model", "family", "measured (ms)", "estimated, left out (ms)", "error")
    for sample, predicted in zip(report.latency, report.latency_predicted):
        table.add_row(sample.name, sample.family, f"{sample.measured_ms:.3f}", f"{predicted:.3f}",
                      f"{100 * (predicted / sample.measured_ms - 1):+.1f} %")
    stdout.print(table)
    stdout.print(f"use it: hat perf MODEL.onnx --march {out}   or   [quant] march = \"{out}\"")


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
