"""`hat benchmark RECIPE`: every way to run the recipe's network on this CPU, side by side.

One row per runtime and precision: torch eager fp32 (the float stage's deploy model), then for
every registered runtime (ONNX Runtime first) fp32 (the float model exported to ONNX) and int8 (the
compiled artifact, the model of the runtime's form). Each row says whether it runs here (a runtime
that is not installed says how to get it), the size of the file it runs, its accuracy on the
validation set, its agreement with the integer program (`int_infer`: same top-1, or same
detections, and the largest output difference in output steps) and its latency (median, p90) and
FPS at the chosen batch and threads. The rows are timed in turns (`hatcli.deploy.timing`), so a
busy machine slows every row alike, and a run during which other processes used more than a tenth
of the machine's CPU is flagged `machine_busy` (`other_cpu_share`; where /proc is not there, a
row that did not get its threads' CPU time flags it).

Stages that are missing or stale are run first, as `hat run` would (a clean machine trains the
recipe); the float ONNX model is written to `runs/<task>/benchmark/float.onnx` and the result to
`runs/<task>/benchmark/benchmark.json`.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hatcli.atomic import atomic_write_json
from hatcli.deploy.cpu import cpu_name
from hatcli.deploy.export import export_onnx
from hatcli.deploy.runtime import load_artifact, runtime_names
from hatcli.deploy.timing import BUSY_CPU_USE, OtherLoad, time_in_turns
from hatcli.engine.loaders import build_loader
from hatcli.errors import HatError
from hatcli.plugins import runtimes
from hatcli.progress import print_line
from hatcli.quant.flow import batch_dynamic_shapes
from hatcli.recipe import LoadedRecipe
from hatcli.stages import default_compile_dir
from hatcli.workflows.compare import compare_models
from hatcli.workflows.pipeline import run_pipeline
from hatcli.workflows.stage_models import artifact_callable, load_float_model, stage_model

REFERENCE = "int_infer"


@dataclass
class Row:
    """One way to run the network: what runs it, and what was measured."""

    name: str
    runtime: str
    precision: str
    status: str = "ok"
    file: str | None = None
    size_mb: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, Any] = field(default_factory=dict)
    median_ms: float | None = None
    p90_ms: float | None = None
    fps: float | None = None
    cpu_use: float | None = None


@dataclass
class _Side:
    """A row that runs: a callable for a val batch (torch in, outputs out) and one for the timing input."""

    row: Row
    model: Callable[[torch.Tensor], Any]
    timed: Callable[[], object]


def _float_onnx(lr: LoadedRecipe, deploy_float: torch.nn.Module, path: Path) -> Path:
    """The float deploy model exported to ONNX with a free batch dimension (what fp32 rows run)."""
    example = lr.family.example_inputs(tuple(lr.recipe.data.input_size), batch=2)
    program = torch.export.export(deploy_float, example, dynamic_shapes=batch_dynamic_shapes(example))
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(program, example, path, list(lr.family.output_names))
    return path


def _size_mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6, 3)


def _state_mb(model: torch.nn.Module) -> float:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return round(buffer.tell() / 1e6, 3)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _runtime_sides(lr: LoadedRecipe, artifact: Path, float_path: Path, threads: int | None,
                   timing_input: np.ndarray) -> tuple[list[_Side], list[Row]]:
    """An fp32 side (the float ONNX file) and an int8 side (the artifact) per registered runtime,
    ONNX Runtime first, both loaded by `load_artifact`; rows that cannot run here, with the reason."""
    sides: list[_Side] = []
    idle: list[Row] = []
    for name in runtime_names():
        missing = runtimes().get(name).missing()
        for precision in ("fp32", "int8"):
            row = Row(name=f"{name} {precision}", runtime=name, precision=precision)
            if missing:
                row.status = f"not installed: {missing}"
                idle.append(row)
                continue
            try:
                loaded = load_artifact(float_path if precision == "fp32" else artifact, threads=threads, runtime=name)
                row.file, row.size_mb = str(loaded.model_path), _size_mb(loaded.model_path)
                side = _Side(row, artifact_callable(loaded), lambda run=loaded.run: run(timing_input))
                side.timed()  # a runtime that loads but cannot run fails here, not in the timing
            except HatError as exc:
                row.status = f"failed: {_first_line(exc)}"
                idle.append(row)
                continue
            except Exception as exc:  # noqa: BLE001 - a runtime plugin's own errors end its row only
                row.status = f"failed: {type(exc).__name__}: {_first_line(exc)}"
                idle.append(row)
                continue
            sides.append(side)
    return sides, idle


def benchmark(lr: LoadedRecipe, batch: int = 1, threads: int | None = None, rounds: int = 5, runs: int = 20,
              warmup: int = 5, images: int | None = None) -> dict[str, Any]:
    """Build what is missing, then measure every row (see the module docstring); the result is also
    written to `runs/<task>/benchmark/benchmark.json`."""
    run_pipeline(lr)
    artifact = default_compile_dir(lr, lr.recipe.quant.march, lr.recipe.deploy.opt)
    threads = threads or torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        float_model, _ = load_float_model(lr)
        deploy_float = lr.family.build_deploy_model(float_model).eval()
        out_dir = lr.run_dir / "benchmark"
        float_path = _float_onnx(lr, deploy_float, out_dir / "float.onnx")
        first, _ = next(iter(build_loader(lr, "val")))
        take = first[:batch] if len(first) >= batch else first.repeat((-(-batch // len(first)), 1, 1, 1))[:batch]
        timing_torch = take.contiguous()
        timing_input = timing_torch.numpy().astype(np.float32)
        torch_row = Row(name="torch fp32", runtime="torch", precision="fp32", size_mb=_state_mb(deploy_float))

        def torch_timed() -> object:
            with torch.no_grad():
                return deploy_float(timing_torch)

        sides = [_Side(torch_row, deploy_float, torch_timed)]
        runtime_sides, idle = _runtime_sides(lr, artifact, float_path, threads, timing_input)
        sides += runtime_sides
        reference, _ = stage_model(lr, REFERENCE)
        print_line(f"benchmark: accuracy and agreement with {REFERENCE} of {len(sides)} rows")
        models = {side.row.name: side.model for side in sides}
        report = compare_models(lr, {**models, REFERENCE: reference}, [(name, REFERENCE) for name in models],
                                limit=images)
        for side, pair in zip(sides, report["agreement"]):
            side.row.metrics = report["stages"][side.row.name]
            side.row.agreement = {k: v for k, v in pair.items() if k not in ("a", "b")}
        print_line(f"benchmark: timing {len(sides)} rows in turns ({rounds} rounds of {runs} runs, batch {batch}, "
                   f"{threads} threads)")
        with OtherLoad() as load:
            seconds, cpu_use = time_in_turns({side.row.name: side.timed for side in sides}, rounds, runs, warmup,
                                             threads)
    finally:
        torch.set_num_threads(before)
    for side in sides:
        times = [t * 1e3 for t in seconds[side.row.name]]
        side.row.median_ms = round(statistics.median(times), 4)
        side.row.p90_ms = round(float(np.percentile(times, 90)), 4)
        side.row.fps = round(batch * 1e3 / side.row.median_ms, 2)
        side.row.cpu_use = round(cpu_use[side.row.name], 3)
    rows = [side.row for side in sides] + idle
    result = {
        "recipe": str(lr.path), "artifact": str(artifact), "march": lr.recipe.quant.march,
        "cpu": cpu_name(), "batch": batch, "threads": threads, "rounds": rounds, "runs_per_round": runs,
        "images": report["images"], "reference": REFERENCE,
        "other_cpu_share": None if load.share is None else round(load.share, 3),
        "machine_busy": load.busy if load.share is not None else any(s.row.cpu_use < BUSY_CPU_USE for s in sides),
        "rows": [asdict(row) for row in rows],
    }
    atomic_write_json(out_dir / "benchmark.json", result)
    return result
