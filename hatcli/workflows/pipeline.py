"""`hat run`: the whole chain, skipping stages whose outputs are up to date.

pack -> float -> calibration -> qat -> int_infer -> export -> check -> compile -> perf -> deploy,
then `summary.json` and the run report (`report.html`, `hatcli.workflows.report`); a recipe whose
quantization scheme has no integer form (LQ-Net) ends after qat, with a row that says why.
Each row of the summary says what the stage measured, how long it took (0 when reused) and
where its files are; each stage also prints one line as it ends. A training stage that an
earlier run left unfinished (Ctrl-C, `kill -9`) with the same settings is resumed from its
`checkpoint-last.pt`, so running the same command again continues where it stopped. A float
stage imported with `hat train --stage calibration --from FILE` counts as the float stage: reused
while the recipe and the file are unchanged, imported again from that file (never trained over)
when not (`hatcli.workflows.training.make_float`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hatcli.atomic import atomic_write_json
from hatcli.deploy.check import check_model
from hatcli.deploy.recipe_build import compile_recipe, estimation_source, perf_report
from hatcli.errors import DataError, warn
from hatcli.family import PackRequest
from hatcli.inputs import data_path
from hatcli.plugins import packers
from hatcli.progress import console, print_line
from hatcli.quant.march import load_march
from hatcli.recipe import LoadedRecipe
from hatcli.stages import (
    artifact_up_to_date,
    can_resume,
    default_compile_dir,
    default_export_dir,
    export_up_to_date,
    is_up_to_date,
    read_stage_record,
    stage_dir,
)
from hatcli.workflows.exporting import export_stage
from hatcli.workflows.stage_models import evaluate_stage
from hatcli.workflows.low_bit_reports import not_integer_schemes
from hatcli.workflows.report import write_report
from hatcli.workflows.training import calibrate, evaluate_int_infer, make_float, train_float, train_qat


@dataclass
class StageRow:
    """One line of the summary table."""

    stage: str
    metric: str
    seconds: float
    artifacts: list[str] = field(default_factory=list)
    reused: bool = False
    values: dict[str, Any] = field(default_factory=dict)


def _metric_text(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())


def _pack(lr: LoadedRecipe) -> StageRow:
    train, val = data_path(lr, "train"), data_path(lr, "val")
    if train.exists() and val.exists():
        return StageRow("pack", "data present", 0.0, [str(train), str(val)], reused=True)
    cfg = lr.recipe.data.pack
    if cfg is None:
        raise DataError(f"no packed data at {train} and the recipe has no [data.pack] table; "
                        f"pack it with `hat pack` first")
    tic = time.perf_counter()
    result = packers().get(cfg.kind).run(PackRequest(
        kind=cfg.kind, target_data_dir=Path(lr.recipe.data.root), task=cfg.task, num_images=cfg.num_images,
        image_size=cfg.image_size, seed=cfg.seed))
    counts = ", ".join(f"{Path(p).name} {n}" for p, n in result.databases.items())
    return StageRow("pack", counts, time.perf_counter() - tic, list(result.databases))


def _run_recorded_stage(lr: LoadedRecipe, stage: str, force: bool) -> StageRow:
    """Reuse one of the stages that keep a `stage.json` (float, calibration, qat, int_infer) when it
    is up to date, else resume it when it was left unfinished with these settings, else run it."""
    if not force and is_up_to_date(lr, stage):
        record = read_stage_record(lr, stage)
        reused = True
    else:
        console.rule(f"[bold]{stage}")
        if not force and can_resume(lr, stage):
            done = read_stage_record(lr, stage)
            print_line(f"{stage}: resuming the unfinished run from {stage_dir(lr, stage) / 'checkpoint-last.pt'} "
                       f"(epoch {done.get('epochs')}/{done.get('epochs_planned')} done)")
            record = {"float": train_float, "qat": train_qat}[stage](lr, resume=True)
        else:
            record = {"float": make_float, "calibration": calibrate, "qat": train_qat,
                      "int_infer": evaluate_int_infer}[stage](lr)
        reused = False
    return StageRow(stage, _metric_text(record["metrics"]), 0.0 if reused else record["seconds"],
                    record["artifacts"][:1], reused, record["metrics"])


def _export(lr: LoadedRecipe, force: bool) -> StageRow:
    out = default_export_dir(lr)
    files = [str(out / "model.pt2"), str(out / "model.onnx")]
    if not force and export_up_to_date(lr, out):
        return StageRow("export", "model.pt2 + model.onnx", 0.0, files, True)
    result = export_stage(lr, out)
    return StageRow("export", "model.pt2 + model.onnx", result["seconds"], files)


def _check(lr: LoadedRecipe) -> StageRow:
    tic = time.perf_counter()
    report = check_model(default_export_dir(lr) / "model.onnx", load_march(lr.recipe.quant.march))
    text = "all ops on BPU" if report.supported else f"{report.fallbacks} ops fall back to CPU"
    return StageRow(f"check ({lr.recipe.quant.march})", text, time.perf_counter() - tic, [],
                    values={"supported": report.supported, "fallbacks": report.fallbacks})


def _compile(lr: LoadedRecipe, force: bool) -> tuple[StageRow, Path]:
    march, opt = lr.recipe.quant.march, lr.recipe.deploy.opt
    out = default_compile_dir(lr, march, opt)
    label = f"compile ({march} -O{opt})"
    if not force and artifact_up_to_date(lr, march, opt, out):
        return StageRow(label, "artifact up to date", 0.0, [str(out)], True), out
    tic = time.perf_counter()
    compile_recipe(lr, march, opt, out)
    return StageRow(label, "artifact written", time.perf_counter() - tic, [str(out)]), out


def _perf(lr: LoadedRecipe, artifact: Path) -> StageRow:
    tic = time.perf_counter()
    report = perf_report(artifact / "model.onnx", lr.recipe.quant.march, measure=True, runs=lr.recipe.deploy.perf_runs,
                         estimate_from=estimation_source(artifact))
    est, measured = report["estimate"], report["measured"]
    text = (f"host {measured['median_ms']:.2f} ms ({measured['fps']:.0f} FPS, measured); "
            f"{est['chip']} {est['latency_ms']:.3f} ms ({est['fps']:.0f} FPS, estimated)")
    return StageRow("perf", text, time.perf_counter() - tic, [str(artifact / "perf.json")],
                    values={"host_ms": measured["median_ms"], "estimated_ms": est["latency_ms"]})


def _deploy_eval(lr: LoadedRecipe, artifact: Path) -> StageRow:
    tic = time.perf_counter()
    metrics = evaluate_stage(lr, "deploy", artifact)["metrics"]
    return StageRow("deploy", _metric_text(metrics), time.perf_counter() - tic, [str(artifact)], values=metrics)


def _stops_here(blocked: dict[str, str]) -> StageRow:
    """The row of a recipe whose scheme has no integer form: the chain ends with its QAT model."""
    reasons = "; ".join(f"`{name}`: {why}" for name, why in blocked.items())
    return StageRow("int_infer", f"not integer-deployable, the run ends here ({reasons}); "
                                 f"`hat eval RECIPE --stage qat` evaluates it, `hat check RECIPE` explains",
                    0.0, values={"deployable": False, "reasons": blocked})


def _reported(row: StageRow) -> StageRow:
    """Print the one line that says how a stage ended (also in a log file, where no bar is drawn)."""
    when = "up to date, reused" if row.reused else f"{row.seconds:.1f} s"
    print_line(f"{row.stage} done: {row.metric} ({when})")
    return row


def run_pipeline(lr: LoadedRecipe, force: bool = False) -> list[StageRow]:
    """Run every stage of the recipe in order; return one summary row per stage."""
    rows = [_reported(_pack(lr))]
    for stage in ("float", "calibration", "qat"):
        if stage == "qat" and not lr.recipe.qat.enabled:
            continue
        row = _reported(_run_recorded_stage(lr, stage, force))
        force = force or not row.reused  # everything after a re-run stage is re-run too
        rows.append(row)
    blocked = not_integer_schemes(lr)
    if blocked:  # LQ-Net: no integer program to convert to, export or compile
        rows.append(_reported(_stops_here(blocked)))
        return _finish(lr, rows)
    rows.append(_reported(_run_recorded_stage(lr, "int_infer", force)))
    rows.append(_reported(_export(lr, force)))
    rows.append(_reported(_check(lr)))
    compile_row, artifact = _compile(lr, force)
    rows.append(_reported(compile_row))
    rows.append(_reported(_perf(lr, artifact)))
    rows.append(_reported(_deploy_eval(lr, artifact)))
    return _finish(lr, rows)


def _finish(lr: LoadedRecipe, rows: list[StageRow]) -> list[StageRow]:
    """Write `summary.json`, then the run report; the stages' work is done and kept, so a report
    that cannot be written is a warning (`hat report` writes it again)."""
    atomic_write_json(lr.run_dir / "summary.json", [asdict(r) for r in rows])
    try:
        write_report(lr)
    except Exception as exc:  # noqa: BLE001 - every stage is done and kept; the report is an extra
        warn(f"could not write {lr.run_dir / 'report.html'} ({type(exc).__name__}: {exc}); "
             f"`hat report {lr.path}` writes it")
    return rows
