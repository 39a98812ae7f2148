"""`hat report`: one self-contained HTML page of a whole run, `runs/<task>/report.html`.

The page gathers what the stages left in the run folder: the stage table (`summary.json` of
`hat run`, else each stage's `stage.json`), training curves from every `metrics.jsonl`, the
quantization summary (the export's manifest and `hat check` on its model), the per-layer latency
of each compiled artifact (`perf.json`) with the estimate's error band, a few validation images
with the last stage's predictions drawn (`hatcli.workflows.report_extras`), the debug findings
of `hat debug`, the resolved recipe, the versions and the git commit. A section whose stage did
not run says so in one sentence, so the page renders for a partial run too.

It is one file with no scripts and nothing fetched: charts are inline SVG, pictures `data:`
URIs, every text from a file is escaped by the template (Jinja2, autoescape on).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hatcli.atomic import atomic_write_text
from hatcli.deploy.check import FALLBACK, check_model
from hatcli.deploy.perf import error_detail, error_phrase
from hatcli.deploy.perf_html import layer_table, slowest_layers_chart
from hatcli.errors import ArtifactError, HatError, UsageError
from hatcli.quant.march import load_march
from hatcli.recipe import LoadedRecipe
from hatcli.stages import TRAIN_STAGES, default_export_dir, read_stage_record, stage_dir
from hatcli.workflows import report_extras
from hatcli.workflows.report_extras import dict_table, read_json
from hatcli.workflows.report_charts import Panel, band_chart, curves_chart
from hatcli.workflows.stage_models import int16_patterns

REPORT = "report.html"
TEMPLATE = "report.html.j2"
SECTIONS = ("stages", "curves", "quantization", "perf", "predictions", "debug")
"""The sections that depend on what ran (the recipe and the versions are always there)."""
RECORDED_STAGES = (*TRAIN_STAGES, "int_infer")
"""The stages that keep a `stage.json`."""


@dataclass
class ReportResult:
    """What `write_report` wrote: the file, its size, and why each missing section is missing."""

    path: Path
    bytes: int
    missing: dict[str, str] = field(default_factory=dict)
    """Section name -> the sentence the page shows in its place."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary `hat report --json` prints."""
        return {"path": str(self.path), "bytes": self.bytes,
                "present": [s for s in SECTIONS if s not in self.missing], "missing": self.missing}


def report_path(lr: LoadedRecipe) -> Path:
    """Where the run report of a recipe goes by default: `runs/<task>/report.html`."""
    return lr.run_dir / REPORT


def write_report(lr: LoadedRecipe, out: Path | None = None,
                 images: int = report_extras.PREDICTION_IMAGES) -> ReportResult:
    """Gather the run folder of `lr` into one HTML page and write it atomically to `out` (default
    `report_path`). `images` validation pictures get the last stage's predictions drawn (0: none).
    UsageError when the recipe has no run folder yet, ArtifactError when the page cannot be written."""
    if not lr.run_dir.is_dir():
        raise UsageError(f"no run folder at {lr.run_dir}: run `hat run {lr.path}` (or `hat train {lr.path} "
                         f"--stage float`) first")
    context = report_context(lr, images)
    page = render_report(context)
    path = Path(out) if out is not None else report_path(lr)
    try:
        atomic_write_text(path, page)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc}") from None
    missing = {name: context[name]["missing"] for name in SECTIONS if context[name]["missing"]}
    return ReportResult(path, len(page.encode("utf-8")), missing)


def render_report(context: dict[str, Any]) -> str:
    """The page for a `report_context` dict (Jinja2, every value escaped unless it is Markup)."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    template = env.from_string(resources.files("hatcli.workflows").joinpath(TEMPLATE).read_text("utf-8"))
    return template.render(**context)


def report_context(lr: LoadedRecipe, images: int = report_extras.PREDICTION_IMAGES) -> dict[str, Any]:
    """Everything the page shows, section by section; a section's `missing` is the sentence shown
    when it has nothing (None when it has something)."""
    return {
        "title": f"hat report: {lr.recipe.task}",
        "recipe_path": str(lr.path), "run_dir": str(lr.run_dir),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "stages": stage_section(lr), "curves": curves_section(lr), "quantization": quant_section(lr),
        "perf": perf_section(lr), "predictions": report_extras.predictions_section(lr, images),
        "debug": report_extras.debug_section(lr), "recipe_toml": lr.to_toml(),
        "environment": report_extras.environment_section(lr),
    }


def _stage_status(record: dict[str, Any] | None) -> str:
    if not record:
        return ""
    if record.get("finished") is False:
        return f"unfinished: {record.get('epochs')} of {record.get('epochs_planned')} epochs"
    return "finished"


def stage_section(lr: LoadedRecipe) -> dict[str, Any]:
    """The stage table: the rows of `summary.json` (what `hat run` printed), else one row per
    stage that left a `stage.json`; each row with its result, time and status."""
    records = {stage: read_stage_record(lr, stage) for stage in RECORDED_STAGES}
    summary, problem = read_json(lr.run_dir / "summary.json") if (lr.run_dir / "summary.json").exists() else (None, None)
    rows = []
    if isinstance(summary, list):
        source = "summary.json, written by the last `hat run`"
        for row in (r for r in summary if isinstance(r, dict)):
            rows.append({"stage": row.get("stage", "?"), "result": row.get("metric", ""),
                         "time": "reused" if row.get("reused") else f"{row.get('seconds', 0):.1f} s",
                         "status": _stage_status(records.get(row.get("stage"))),
                         "files": row.get("artifacts", [])})
    else:
        source = f"each stage's stage.json (no summary.json: `hat run {lr.path}` writes one)"
        for stage, record in records.items():
            if record:
                metrics = "  ".join(f"{k} {v:.2f}" for k, v in record.get("metrics", {}).items()
                                    if isinstance(v, (int, float)))
                rows.append({"stage": stage, "result": metrics, "time": f"{record.get('seconds', 0):.1f} s",
                             "status": _stage_status(record), "files": record.get("artifacts", [])})
    missing = None if rows else f"no stage has run yet: `hat run {lr.path}` runs them all."
    return {"rows": rows, "source": source, "problem": problem, "missing": missing}


def _curve_group(key: str) -> str:
    """Which panel a metrics.jsonl key is drawn in."""
    name = key.lower()
    if "loss" in name:
        return "loss"
    if name == "lr" or name.startswith("lr_"):
        return "learning rate"
    if name.endswith("_per_s"):
        return "throughput (per s)"
    return "metrics"


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The epoch records of a `metrics.jsonl` and how many of its lines were not JSON objects."""
    records, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def curve_panels(records: list[dict[str, Any]]) -> list[Panel]:
    """Panels of loss, metrics, learning rate and throughput per epoch from epoch records."""
    panels = {name: Panel(name) for name in ("loss", "metrics", "learning rate", "throughput (per s)")}
    for index, record in enumerate(records):
        x = record.get("epoch", index + 1)
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            x = index + 1
        for key, value in record.items():
            if key in ("epoch", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            panels[_curve_group(key)].series.setdefault(key, []).append((float(x), float(value)))
    return list(panels.values())


def _imported(lr: LoadedRecipe, stage: str) -> dict[str, Any] | None:
    """Where a float stage's weights came from when they were imported rather than trained
    (its stage.json's `weights_from`), else None."""
    record = read_stage_record(lr, stage) if stage == "float" else None
    source = record.get("weights_from") if isinstance(record, dict) else None
    return source if isinstance(source, dict) else None


def curves_section(lr: LoadedRecipe) -> dict[str, Any]:
    """One chart per training stage with a `metrics.jsonl`, and a sentence for each stage without."""
    from markupsafe import Markup

    stages = []
    for stage in TRAIN_STAGES:
        folder, entry = stage_dir(lr, stage), {"stage": stage, "chart": None, "note": None, "epochs": 0}
        metrics = folder / "metrics.jsonl"
        if stage == "qat" and not lr.recipe.qat.enabled:
            entry["note"] = "QAT is off in this recipe (`qat.enabled = false`)."
        elif not metrics.is_file() and (source := _imported(lr, stage)):
            entry["note"] = (f"{stage} trained no epochs here: its weights were imported from {source.get('path')} "
                             f"(sha256 {str(source.get('sha256', ''))[:12]}, via {source.get('via')}): no curves.")
        elif not metrics.is_file():
            entry["note"] = (f"{stage} has not run: `hat train {lr.path} --stage {stage}` runs it."
                             if not folder.is_dir() else
                             "calibration trains no epochs (observers only, in eval mode): no curves."
                             if stage == "calibration" else f"{stage} wrote no metrics.jsonl.")
        else:
            records, skipped = read_metrics(metrics)
            chart = curves_chart(curve_panels(records), f"{stage} curves")
            entry.update(chart=Markup(chart) if chart else None, epochs=len(records))
            if not chart:
                entry["note"] = f"{metrics} holds no epoch with numbers yet."
            elif skipped:
                entry["note"] = f"{skipped} line(s) of {metrics} were not JSON records and are left out."
        stages.append(entry)
    drawn = any(s["chart"] for s in stages)
    return {"stages": stages, "missing": None if drawn else "no training stage has written curves yet."}


def quant_section(lr: LoadedRecipe) -> dict[str, Any]:
    """The export's record (march, source stage, low-bit layers, saturated biases), the int16
    patterns, and `hat check` on the exported model (int16 layers, CPU fallbacks)."""
    export_dir = default_export_dir(lr)
    manifest_path = export_dir / "manifest.json"
    section: dict[str, Any] = {"missing": None, "facts": [], "problem": None, "low_bit": dict_table([]),
                               "bias": dict_table([]), "int16": dict_table([]), "fallbacks": dict_table([]),
                               "check": None}
    if not manifest_path.is_file():
        section["missing"] = (f"not exported yet: `hat export {lr.path}` (or `hat run {lr.path}`) writes "
                              f"{export_dir}, and `hat check {lr.path}` reads it.")
        return section
    manifest, problem = read_json(manifest_path)
    if not isinstance(manifest, dict):
        section["missing"] = problem or f"{manifest_path} is not a manifest"
        return section
    march = manifest.get("march") or lr.recipe.quant.march
    quant = lr.recipe.quant
    scheme = quant.scheme if quant.scheme == "march" else f"{quant.scheme} W{quant.weight_bits}A{quant.activation_bits}"
    section["low_bit"] = dict_table(manifest.get("low_bit_layers", []))
    section["bias"] = dict_table(manifest.get("bias_saturation", []))
    try:
        profile = load_march(march)
        patterns = int16_patterns(lr, profile)
        report = check_model(export_dir / "model.onnx", profile)
    except HatError as exc:
        section["problem"] = f"`hat check` could not read the exported model: {exc}"
        patterns, report = list(quant.int16), None
    section["facts"] = [("march", march), ("exported from", manifest.get("source_stage", "?")),
                        ("scheme", scheme), ("int16 patterns", ", ".join(patterns) or "none")]
    if report is not None:
        section["check"] = {"layers": len(report.rows), "fallbacks": report.fallbacks, "supported": report.supported,
                            "notes": report.notes}
        section["int16"] = dict_table([{"node": r.node, "module": r.module or "-", "op": r.op_type}
                                       for r in report.rows if r.dtype == "int16"])
        section["fallbacks"] = dict_table([{"node": r.node, "module": r.module or "-", "op": r.op_type,
                                            "reason": r.reason} for r in report.rows if r.status == FALLBACK])
        if report.low_bit_layers:
            section["low_bit"] = dict_table([{"module": v.layer.module, "how the march runs it": v.describe()}
                                             for v in report.low_bit_layers])
    return section


def estimate_words(estimate: dict[str, Any]) -> dict[str, Any]:
    """How an estimate is worded and banded: `headline` ("X ms, estimated: median error N % on M
    measured models"), `detail`, and the band (`low_ms`, `high_ms`: +- the median error) where
    the fitted model was checked on measured models; no band for a roofline or an unchecked fit."""
    ms = estimate["latency_ms"]
    error = estimate.get("error")
    words: dict[str, Any] = {"headline": f"{ms:.3f} ms", "detail": "", "band": "", "low_ms": None, "high_ms": None,
                             "extrapolation": ""}
    if error:
        words["headline"] += f", estimated: {error_phrase(error)}"
        words["detail"] = error_detail(error)
        median = error.get("median_abs_error")
        if error.get("rows") and median is not None:
            words["low_ms"], words["high_ms"] = ms * max(0.0, 1 - median), ms * (1 + median)
            words["band"] = (f"band +-{100 * median:.0f} % (the median error): {words['low_ms']:.3f} to "
                             f"{words['high_ms']:.3f} ms; half the measured models fell inside theirs")
    elif estimate.get("estimated"):
        words["headline"] += (", estimated by the roofline cost model (docs/perf_model.md), not fitted to "
                              "measured latencies of this march: no error band")
    else:
        words["headline"] += ", hat's cost model of this host"
    if estimate.get("extrapolated"):
        words["extrapolation"] = "extrapolated: " + "; ".join(estimate.get("extrapolation", []))
    return words


def perf_section(lr: LoadedRecipe) -> dict[str, Any]:
    """Every compiled artifact's `perf.json`: the estimate with its error words and band, the host
    measurement where the artifact has one, the slowest layers and the per-layer table."""
    from markupsafe import Markup

    artifacts = []
    folders = sorted(p for p in (lr.run_dir / "compile").glob("*") if (p / "perf.json").is_file())
    for folder in folders:
        perf, problem = read_json(folder / "perf.json")
        entry: dict[str, Any] = {"name": folder.name, "folder": str(folder), "problem": problem, "chip": None,
                                 "estimate": None, "measured": None}
        artifacts.append(entry)
        if not isinstance(perf, dict):
            entry["problem"] = problem or f"{folder / 'perf.json'} is not a perf report"
            continue
        estimate, measured = perf.get("estimate"), perf.get("measured")
        entry.update(march=perf.get("march"), chip=perf.get("chip"), measured=measured)
        if not estimate:
            entry["problem"] = f"no estimate: {perf.get('estimate_error', 'perf.json has none')}"
            continue
        words = estimate_words(estimate)
        host_ms = measured["median_ms"] if measured and not estimate.get("estimated") else None
        entry.update(estimate=estimate, words=words, layers=len(estimate.get("layers", [])),
                     band=Markup(band_chart(estimate["latency_ms"], words["low_ms"], words["high_ms"], host_ms,
                                            label=f"{folder.name} estimate"))
                     if words["low_ms"] is not None or host_ms is not None else None,
                     slowest=Markup(slowest_layers_chart(estimate.get("layers", []))),
                     table=Markup(layer_table(estimate.get("layers", []))))
    missing = None if folders else (f"not compiled yet: `hat compile {lr.path}` (or `hat run {lr.path}`) writes "
                                    f"{lr.run_dir / 'compile'}/<march>-O<opt>/perf.json.")
    return {"artifacts": artifacts, "missing": missing}
