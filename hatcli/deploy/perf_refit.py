"""`hat perf --fit`: a march profile calibrated on latencies a user measured on their own board.

The measurements are a CSV with one row per model:

    model,latency_ms,fps,threads,family
    models/resnet18.onnx,2.31,,1,resnet
    models/yolov8n.onnx,7.90,220.5,4,yolov8

`model` is an ONNX file (a path relative to the CSV); `latency_ms` the single-frame latency
(`hrt_model_exec perf` with one thread); optional `fps` with `threads` > 1 the throughput under
load; optional `family` groups models for the leave-one-family-out error (default: each model is
its own family, i.e. leave-one-out). `input_h` and `input_w` fix dynamic input sizes. The new
profile is the base march's with `[cost.fitted]` replaced.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from hatcli.deploy.onnx_graph import read_graph
from hatcli.deploy.perf_fit import FitReport, MeasuredGraph, fit_march
from hatcli.errors import UsageError
from hatcli.march_profile import MarchProfile, write_march_file

REQUIRED = ("model", "latency_ms")
OPTIONAL = ("fps", "threads", "family", "input_h", "input_w")


def _number(row: dict[str, str], key: str, where: str, kind: type = float) -> Any:
    text = (row.get(key) or "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise UsageError(f"{where}: `{key}` must be a number, not {text!r}") from None
    if value <= 0:
        raise UsageError(f"{where}: `{key}` must be positive, not {text}")
    return value


def read_measurements(csv_path: Path) -> list[MeasuredGraph]:
    """Read the measurements CSV and each model it names; UsageError naming the file, line and
    column for anything wrong."""
    try:
        text = csv_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{csv_path}: cannot read the measurements: {exc.strerror or exc}") from None
    reader = csv.DictReader(text.splitlines())
    columns = reader.fieldnames or []
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise UsageError(f"{csv_path}: missing column(s) {', '.join(missing)}; the columns are "
                         f"{', '.join(REQUIRED)} and optionally {', '.join(OPTIONAL)}")
    measured = []
    for line, row in enumerate(reader, start=2):
        where = f"{csv_path}:{line}"
        name = (row.get("model") or "").strip()
        if not name:
            raise UsageError(f"{where}: `model` is empty")
        path = (csv_path.parent / name) if not Path(name).is_absolute() else Path(name)
        if not path.is_file():
            raise UsageError(f"{where}: no such model file: {path}")
        latency = _number(row, "latency_ms", where)
        if latency is None:
            raise UsageError(f"{where}: `latency_ms` is empty")
        fps, threads = _number(row, "fps", where), _number(row, "threads", where, int)
        h, w = _number(row, "input_h", where, int), _number(row, "input_w", where, int)
        shape = [1, 3, h, w] if h and w else None
        graph = read_graph(path, batch=1, input_shape=shape)
        under_load = 1e3 / fps if fps and (threads or 1) > 1 else None
        measured.append(MeasuredGraph(name=name, family=(row.get("family") or "").strip() or name, graph=graph,
                                      latency_ms=latency, frame_ms_under_load=under_load, threads=threads))
    if len(measured) < 3:
        raise UsageError(f"{csv_path}: {len(measured)} measured model(s); fitting needs at least 3 "
                         "(from at least 2 families)")
    return measured


def refit_march(csv_path: Path, base: MarchProfile, out: Path,
                name: str | None = None) -> tuple[MarchProfile, FitReport]:
    """Fit `base`'s latency model to the measurements in `csv_path`, write the new profile to
    `out` (named `name`, default the file's stem) and return it with the fit's report."""
    measured = read_measurements(csv_path)
    try:
        fitted, report = fit_march(base, measured, data=f"{csv_path.name} ({len(measured)} models)")
    except ValueError as exc:
        raise UsageError(f"{csv_path}: {exc}") from None
    label = name or out.stem
    fitted = fitted.model_copy(update={
        "name": label, "description": f"{base.description} Latency model fitted to {csv_path.name}.",
        "sources": [*base.sources, f"cost.fitted: hat perf --fit {csv_path.name} (board measurements)"]})
    write_march_file(fitted, out, header=f"March profile `{label}`: `{base.name}` with its latency model fitted "
                                         f"by `hat perf --fit {csv_path.name}`.")
    return fitted, report
