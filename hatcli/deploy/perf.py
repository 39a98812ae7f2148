"""Latency: a per-layer estimate on a march (`estimate_latency`) and a measurement on this host
with ONNX Runtime (`measure_latency`).

A march whose profile has a fitted model (`[cost.fitted]`, fitted to measured whole-model
latencies by hatcli/deploy/perf_fit.py) is estimated with it: a sum of per-block work counts times
fitted coefficients (hatcli/deploy/perf_features.py), reported with the fit's measured error and
flagged when the model has work the fit never saw. Otherwise the estimate is a roofline per layer
(see docs/perf_model.md):

    compute = 2 * MACs / (int8_tops * 1e12 * utilisation)    (depthwise, narrow-input and
              + output elements * ns per element          graph-output convs have their own
                                                          utilisation; adds, pooling and
                                                          unfused table activations their ns)
    memory  = (activation bytes read + written + constant bytes) / (ddr_gbytes_per_s * 1e9)
    layer   = max(compute, memory) + per_layer_overhead_us      (reshape-like views cost nothing)

On a march we cannot run (`estimated = true`) every figure it gives is an estimate.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hatcli.deploy.check import FALLBACK, check_graph
from hatcli.deploy.onnx_graph import Graph, Layer, load_onnx, read_graph, resolve_model_path
from hatcli.deploy.perf_features import BlockFeatures, graph_features, model_features
from hatcli.deploy.perf_fit import MIN_FAMILIES, extrapolation, predict_ms
from hatcli.deploy.runtime import OrtSession, opt_level_name, runtime_spec
from hatcli.errors import UsageError
from hatcli.march_profile import FittedCost
from hatcli.progress import make_progress
from hatcli.quant.march import MarchProfile


@dataclass
class LayerEstimate:
    """Estimated cost of one layer."""

    name: str
    """The ONNX node heading the layer (`node_conv2d_26`)."""
    op_type: str
    fused: list[str]
    macs: int
    ddr_bytes: int
    """Activation bytes read and written plus constant bytes, for the whole batch."""
    compute_us: float
    memory_us: float
    time_us: float
    bound: str
    """What limits the layer: "compute", "memory" or "overhead" (view ops: "none")."""
    percent: float = 0.0
    """Share of the model's estimated time."""
    fallback: bool = False
    """True when `hat check` says this layer falls back to the CPU (its time is not modelled)."""
    module: str = ""
    """Dotted path of the module the layer was traced from (`features.12.1`; "" for the root)."""


@dataclass
class PerfEstimate:
    """Estimated latency of a model on a march."""

    model: str
    march: str
    chip: str
    batch: int
    estimated: bool
    latency_ms: float
    fps: float
    total_macs: int
    """MACs for the whole batch."""
    ops_per_frame: int
    """2 x MACs per frame (the unit of TOPS)."""
    ddr_bytes_per_frame: int
    ddr_mbytes_per_s: float
    compute_ms: float
    memory_ms: float
    overhead_ms: float
    layers: list[LayerEstimate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cost_model: str = "roofline"
    """`fitted` (a model fitted to measured latencies, with its measured error) or `roofline`."""
    error: dict[str, Any] | None = None
    """The fitted model's error on measured models it was not fitted to (FitError fields)."""
    extrapolated: bool = False
    """True when the model has work the fit never saw (or far more of it): trust it less."""
    extrapolation: list[str] = field(default_factory=list)
    load_fps: float | None = None
    """Estimated frames per second with `load_threads` threads feeding the accelerator."""
    load_threads: int | None = None
    load_error: dict[str, Any] | None = None
    """The fitted throughput model's measured error (FitError fields)."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (per-layer list included)."""
        return asdict(self)

    def error_text(self) -> str:
        """`estimated: median error 9 % on 87 measured <chip> models (...)`, or "" without a fitted model."""
        return estimate_error_text(self.error, self.chip, self.extrapolation if self.extrapolated else [])


def error_phrase(error: dict[str, Any], chip: str = "") -> str:
    """`median error 9 % on 87 measured [chip] models`, from a fitted model's error (FitError fields),
    or `not checked against any measured [chip] model (<where the fit comes from>)` for a fit carried
    over from another chip: the words every report (hat perf, perf.json notes, perf.html) shows
    beside an estimate."""
    models = f"{chip} models" if chip else "models"
    if not error["rows"]:
        where = f" ({error['data']})" if error.get("data") else ""
        return f"not checked against any measured {chip + ' ' if chip else ''}model{where}"
    return f"median error {100 * error['median_abs_error']:.0f} % on {error['rows']} measured {models}"


def estimate_error_text(error: dict[str, Any] | None, chip: str, extrapolation: list[str]) -> str:
    """The note beside a fitted estimate: its error phrase and detail, then why it is an
    extrapolation (when `extrapolation` lists reasons); "" without a fitted model."""
    if not error:
        return ""
    detail = error_detail(error)
    text = f"estimated: {error_phrase(error, chip)}" + (f" ({detail})" if detail else "")
    return text + (" - extrapolated: " + "; ".join(extrapolation) if extrapolation else "")


def error_detail(error: dict[str, Any]) -> str:
    """`leave one model family out; 55 % within +-10 %, 80 % within +-25 %` ("" when unchecked)."""
    if not error["rows"]:
        return ""
    return (f"{error['method']}; {100 * error['within_10']:.0f} % within +-10 %, "
            f"{100 * error['within_25']:.0f} % within +-25 %")


@dataclass
class PerfMeasurement:
    """Latency measured on this host with a runtime (ONNX Runtime unless `runtime` says otherwise)."""

    model: str
    batch: int
    threads: int | None
    """intra-op threads requested (None: ONNX Runtime's default)."""
    opt_level: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    fps: float
    runs: int
    warmup: int
    device: str = "cpu (onnxruntime CPUExecutionProvider)"
    estimated: bool = False
    runtime: str = "onnxruntime"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


TABLE_ACTIVATIONS = {"Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "Exp", "SiLU"}
"""Activations an integer runtime computes with a 256-entry table."""


def conv_class(layer: Layer) -> str:
    """Which kernel class a layer with MACs falls in: `depthwise`, `output` (a conv / matmul whose
    int32 accumulator is a graph output), `narrow` (input channels per group not a multiple of
    4, e.g. the stem on an RGB image) or `dense`."""
    if layer.is_depthwise:
        return "depthwise"
    if layer.graph_output and layer.op_type in ("Conv", "Gemm", "MatMul"):
        return "output"
    per_group = layer.weight_shape[1] if layer.op_type == "Conv" and layer.weight_shape else None
    if per_group is not None and per_group % 4:
        return "narrow"
    return "dense"


def utilisation(layer: Layer, march: MarchProfile) -> float:
    """The fraction of `march`'s peak int8 rate that `layer` reaches, by its `conv_class`
    (a class the march gives no figure for runs at `utilisation`)."""
    cost = march.cost
    by_class = {"depthwise": cost.depthwise_utilisation, "output": cost.output_conv_utilisation,
                "narrow": cost.narrow_input_utilisation}
    return by_class.get(conv_class(layer)) or cost.utilisation


def elementwise_us(layer: Layer, march: MarchProfile) -> float:
    """Compute time of a layer's elementwise work on `march`: every output element of a layer
    without MACs, and a table per output element for each activation the march does not fuse
    (SiLU, `x * sigmoid(x)`, also a quantized multiply)."""
    cost = march.cost
    elements = sum(math.prod(shape) for shape in layer.output_shapes if shape)
    ns = 0.0
    if layer.macs and conv_class(layer) == "narrow":
        ns += cost.narrow_input_ns_per_element
    if layer.macs == 0:
        ns += cost.table_ns_per_element if layer.op_type in TABLE_ACTIVATIONS else cost.elementwise_ns_per_element
    for act in layer.fused:
        if act in TABLE_ACTIVATIONS and act not in march.fusible_activations:
            ns += cost.table_ns_per_element
            if act == "SiLU":  # x * sigmoid(x): the table, then a quantized multiply
                ns += cost.elementwise_ns_per_element
    return elements * ns / 1e3


def layer_cost(layer: Layer, march: MarchProfile, assume: str | None = None) -> LayerEstimate:
    """Return the estimated cost of one layer on `march` (see the module docstring)."""
    read, written = layer.activation_bytes(assume)
    ddr = 0 if layer.is_view else read + written + layer.weight_bytes(assume)
    cost = march.cost
    compute_us = 2 * layer.macs / (march.int8_tops * 1e12 * utilisation(layer, march)) * 1e6
    compute_us += 0.0 if layer.is_view else elementwise_us(layer, march)
    memory_us = ddr / (cost.ddr_gbytes_per_s * 1e9) * 1e6
    if layer.is_view:
        return LayerEstimate(layer.name, layer.op_type, list(layer.fused), layer.macs, 0,
                             0.0, 0.0, 0.0, "none", module=layer.module)
    base = max(compute_us, memory_us)
    bound = "compute" if compute_us >= memory_us else "memory"
    if cost.per_layer_overhead_us > base:
        bound = "overhead"
    return LayerEstimate(layer.name, layer.op_type, list(layer.fused), layer.macs, ddr,
                         compute_us, memory_us, base + cost.per_layer_overhead_us, bound, module=layer.module)


def _fitted_layer(block: BlockFeatures, coefficients: dict[str, float]) -> LayerEstimate:
    """One block's share of a fitted estimate: compute (MAC terms), memory (byte terms), the rest."""
    terms = {f: coefficients.get(f, 0.0) * v * 1e3 for f, v in block.values.items()}
    compute = sum(t for f, t in terms.items() if f.endswith("_gmac"))
    memory = terms.get("activation_mb", 0.0) + terms.get("weight_mb", 0.0)
    total = sum(terms.values())
    rest = total - compute - memory
    bound = "cpu" if block.fallback else max((("compute", compute), ("memory", memory), ("overhead", rest)),
                                              key=lambda item: item[1])[0]
    ddr = int(1e6 * (block.values.get("activation_mb", 0.0) + block.values.get("weight_mb", 0.0)))
    return LayerEstimate(block.name, block.op_type, list(block.fused), block.macs, ddr, compute, memory, total,
                         bound, fallback=block.fallback, module=block.module)


def unseen_ops(blocks: list[BlockFeatures], fitted: FittedCost) -> list[str]:
    """Why `blocks` fall outside the op classes the fitted models had: a CPU fallback when no
    fitted model had any, an op the fitted models never ran on the accelerator, an op that never
    fell back to the CPU in them (each with its count)."""
    fallbacks = [b.op_type for b in blocks if b.fallback]
    if fallbacks and not fitted.support.get("cpu_block"):
        return [f"{len(fallbacks)} layer(s) fall back to the CPU and the fit has no CPU cost (models of "
                f"fewer than {MIN_FAMILIES} fitted families had CPU fallbacks)"]
    reasons = []
    for where, ops, seen in (("on the accelerator", [b.op_type for b in blocks if not b.fallback], fitted.bpu_ops),
                             ("on the CPU", fallbacks, fitted.cpu_ops)):
        if not seen:
            continue  # not recorded in this profile
        for op in sorted(set(ops) - set(seen)):
            reasons.append(f"{op} {where} ({ops.count(op)} layer(s)): no fitted model ran one there")
    return reasons


def _fitted_estimate(graph: Graph, march: MarchProfile) -> PerfEstimate:
    """The estimate of a march whose profile carries a fitted model (`[cost.fitted]`)."""
    fitted = march.cost.fitted
    assert fitted is not None
    blocks = graph_features(graph, march, fitted.channel_alignment, fitted.input_alignment)
    rows = [_fitted_layer(b, fitted.latency_ms) for b in blocks]
    total_macs = sum(layer.macs for layer in graph.layers)
    batch = graph.batch
    per_frame = model_features(blocks, batch)
    latency_ms = (sum(r.time_us for r in rows) / 1e3 + fitted.latency_ms.get("frame", 0.0) * batch)
    total_us = latency_ms * 1e3 or 1e-9
    for r in rows:
        r.percent = round(100.0 * r.time_us / total_us, 2)
    reasons = extrapolation(per_frame, fitted.support) + unseen_ops(blocks, fitted)
    notes = [] if graph.quantized else ["model is not quantized: activations and weights costed as int8"]
    load_fps = None
    if fitted.frame_ms_under_load:
        load_fps = 1e3 / max(predict_ms(fitted.frame_ms_under_load, per_frame), 1e-6)
    ddr_frame = sum(r.ddr_bytes for r in rows) // batch
    fps = batch * 1e3 / latency_ms
    estimate = PerfEstimate(
        model=graph.path, march=march.name, chip=march.chip, batch=batch, estimated=march.estimated,
        latency_ms=latency_ms, fps=fps, total_macs=total_macs,
        ops_per_frame=2 * total_macs // batch, ddr_bytes_per_frame=ddr_frame,
        ddr_mbytes_per_s=ddr_frame * fps / 1e6, compute_ms=sum(r.compute_us for r in rows) / 1e3,
        memory_ms=sum(r.memory_us for r in rows) / 1e3,
        overhead_ms=(sum(r.time_us - r.compute_us - r.memory_us for r in rows) / 1e3
                     + fitted.latency_ms.get("frame", 0.0) * batch),
        layers=rows, notes=notes, cost_model="fitted", error=fitted.error.model_dump(),
        extrapolated=bool(reasons), extrapolation=reasons, load_fps=load_fps, load_threads=fitted.load_threads,
        load_error=fitted.throughput_error.model_dump() if fitted.throughput_error and load_fps else None)
    estimate.notes.append(estimate.error_text())
    return estimate


def estimate_graph(graph: Graph, march: MarchProfile) -> PerfEstimate:
    """Estimate an already-read graph on `march` (see `estimate_latency`): with the march's
    fitted model when its profile has one, else with the roofline of the module docstring."""
    if march.cost.fitted is not None:
        return _fitted_estimate(graph, march)
    notes: list[str] = []
    assume = None
    if not graph.quantized:
        assume = "int8"
        notes.append("model is not quantized: activations and weights costed as int8")
    rows = [layer_cost(layer, march, assume) for layer in graph.layers]
    report = check_graph(graph, march)
    fallbacks = 0
    for row, verdict in zip(rows, report.rows):
        row.fallback = verdict.status == FALLBACK
        fallbacks += row.fallback
    if fallbacks:
        notes.append(f"{fallbacks} layer(s) fall back to the CPU on {march.name}; they are costed as "
                     "if they ran on the accelerator and CPU transfer time is not modelled")
    if any(layer.macs == 0 and layer.op_type in ("Conv", "Gemm", "MatMul") for layer in graph.layers):
        notes.append("some layer shapes are unknown (dynamic dims): their MACs count as 0")
    total_us = sum(r.time_us for r in rows) or 1e-9
    for r in rows:
        r.percent = round(100.0 * r.time_us / total_us, 2)
    batch = graph.batch
    latency_ms = total_us / 1e3
    ddr_frame = sum(r.ddr_bytes for r in rows) // batch
    fps = batch * 1e3 / latency_ms
    overhead = sum(march.cost.per_layer_overhead_us for r in rows if r.bound != "none") / 1e3
    if march.estimated:
        notes.append(f"estimated: {march.name} cannot run here; figures come from the cost model "
                     "in docs/perf_model.md")
    total_macs = sum(r.macs for r in rows)
    return PerfEstimate(
        model=graph.path, march=march.name, chip=march.chip, batch=batch,
        estimated=march.estimated, latency_ms=latency_ms, fps=fps, total_macs=total_macs,
        ops_per_frame=2 * total_macs // batch, ddr_bytes_per_frame=ddr_frame,
        ddr_mbytes_per_s=ddr_frame * fps / 1e6,
        compute_ms=sum(r.compute_us for r in rows) / 1e3,
        memory_ms=sum(r.memory_us for r in rows) / 1e3, overhead_ms=overhead,
        layers=rows, notes=notes)


def estimate_latency(onnx_path: str | Path, march: MarchProfile, batch: int = 1,
                     input_shape: list[int] | None = None) -> PerfEstimate:
    """Estimate the latency of the ONNX model at `onnx_path` on `march` at `batch`.

    `input_shape` fixes dynamic non-batch input dims. The result carries
    `estimated = march.estimated`. Raises UsageError for a missing or non-ONNX file.
    """
    return estimate_graph(read_graph(onnx_path, batch=batch, input_shape=input_shape), march)


def random_feed(session: Any, batch: int, input_shape: list[int] | None = None,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Return random inputs for every input of a loaded model at `batch`: a `RuntimeSession` or an
    ONNX Runtime InferenceSession."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for inp in session.inputs if hasattr(session, "inputs") else OrtSession(session).inputs:
        dims = list(inp.shape)
        shape = [batch] + [int(d) if isinstance(d, int) else None for d in dims[1:]]
        if input_shape is not None:
            shape = [batch] + [int(d) for d in input_shape[1:]]
        if any(d is None for d in shape):
            raise UsageError(f"input `{inp.name}` has dynamic dims {dims}: give the input shape")
        dtype = np.dtype(inp.dtype)
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[inp.name] = rng.integers(0, 100, size=shape).astype(dtype)
    return feed


def measure_latency(onnx_path: str | Path, batch: int = 1, threads: int | None = None,
                    warmup: int = 10, runs: int = 50, opt_level: int = 3,
                    input_shape: list[int] | None = None, progress: bool = False,
                    runtime: str | None = None) -> PerfMeasurement:
    """Measure the latency of the ONNX model at `onnx_path` on this CPU with the registered runtime
    `runtime` (default ONNX Runtime, at graph optimization `opt_level`).

    Random inputs at `batch`; `warmup` untimed runs, then `runs` timed runs. `threads` sets
    intra-op threads (None: the runtime's default). `progress` draws a progress bar.
    """
    if runs < 1 or warmup < 0 or batch < 1:
        raise UsageError("runs and batch must be >= 1, warmup >= 0")
    level = opt_level_name(opt_level)
    onnx_path = resolve_model_path(onnx_path)
    load_onnx(onnx_path, external_data=False)
    spec = runtime_spec(runtime)
    session = spec.load(onnx_path, threads, {"graph_optimization_level": level})
    feed = random_feed(session, batch, input_shape)
    for _ in range(warmup):
        session.run(feed)
    times: list[float] = []
    bar = make_progress() if progress else None
    task = bar.add_task("timing", total=runs) if bar else None
    if bar:
        bar.start()
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            session.run(feed)
            times.append((time.perf_counter() - t0) * 1e3)
            if bar and task is not None:
                bar.advance(task)
    finally:
        if bar:
            bar.stop()
    median = statistics.median(times)
    p90 = float(np.percentile(times, 90))
    device = "cpu (onnxruntime CPUExecutionProvider)" if spec.name == "onnxruntime" else f"cpu ({spec.name})"
    return PerfMeasurement(model=str(onnx_path), batch=batch, threads=threads, opt_level=opt_level,
                           median_ms=median, p90_ms=p90, mean_ms=statistics.fmean(times),
                           min_ms=min(times), fps=batch * 1e3 / median, runs=runs, warmup=warmup,
                           device=device, runtime=spec.name)
