"""Calibrate the `host` march: measure this CPU's int8 throughput through ONNX Runtime and its
DRAM bandwidth, and return a `MarchProfile` whose cost model uses the measured numbers.

Micro-benchmarks (each a small ONNX graph built here, run with ONNX Runtime's CPU provider):
- dense: 3x3 QLinearConv layers at ResNet-like channel counts and resolutions (uint8
  activations, int8 per-channel weights, as ONNX Runtime runs our QDQ artifacts) -> GOPS;
- depthwise: 3x3 depthwise QLinearConv layers (256 channels, 28x28) -> depthwise GOPS;
- matmul: a chain of MatMulInteger -> GOPS (reported; the profile uses the conv figure);
- small: a chain of 64 1x1 QLinearConv on a 64x14x14 tensor -> fixed cost per layer (what is
  left after their MACs at the dense rate: dispatch to the threads, requantization);
- DRAM: numpy copy of a 256 MiB buffer (bytes read + written per second);
- and four QDQ graphs (hatcli/deploy/host_graphs.py) lowered by the compiler's own passes: a
  3-channel stem conv (input channels not a multiple of 4 take a slower kernel), a 3x3 conv
  whose int32 accumulator is the graph output (a detection head's last conv), and chains of
  1x1 convs followed by quantized adds or by sigmoid tables, against the same chain without
  them -> the extra nanoseconds per output element of an add and of a table.

The result is cached as JSON in `~/.cache/hatcli/host_profile.json` (`$XDG_CACHE_HOME` honoured),
keyed by CPU model, core count, thread count and ONNX Runtime version.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hatcli.atomic import atomic_write_json
from hatcli.progress import make_progress
from hatcli.quant.march import MarchProfile, load_march

CACHE_VERSION = 2


def default_cache_path() -> Path:
    """Return `$XDG_CACHE_HOME/hatcli/host_profile.json` (default `~/.cache/...`)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hatcli" / "host_profile.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_fingerprint(threads: int | None, quick: bool = False) -> dict[str, Any]:
    """Identify this machine and runtime, so a cached calibration is reused only where it holds."""
    import onnxruntime as ort

    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "threads": threads, "quick": quick,
            "onnxruntime": ort.__version__, "version": CACHE_VERSION}


ConvSpec = tuple[int, int, int, int, bool]
"""(in channels, out channels, kernel, stride, depthwise) of one benchmark conv."""

RESNET_LIKE: list[ConvSpec] = [
    (64, 64, 3, 1, False), (64, 128, 3, 2, False), (128, 128, 3, 1, False), (128, 256, 3, 2, False),
    (256, 256, 3, 1, False), (256, 512, 3, 2, False), (512, 512, 3, 1, False)]
"""Dense 3x3 convs at the channel / resolution mix of a ResNet (input 56x56)."""
DEPTHWISE: list[ConvSpec] = [(256, 256, 3, 1, True)] * 6
"""Depthwise 3x3 convs at a mid-network MobileNet width (input 28x28)."""


def conv_net(specs: list[ConvSpec], size: int) -> tuple[onnx.ModelProto, int, int]:
    """Build a chain of QLinearConv (uint8 activations, int8 per-channel weights, zero points 0).

    Returns the model, its total MACs and the MACs of its depthwise layers.
    """
    from hatcli.deploy.cpu import exact_u8s8

    rng = np.random.default_rng(0)
    signed_weights = exact_u8s8()  # the weight format `hat compile` gives this CPU
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "a_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "a_zp")]
    nodes, x, h = [], "x", size
    macs = dw_macs = 0
    for i, (cin, cout, k, stride, depthwise) in enumerate(specs):
        per_group = 1 if depthwise else cin
        w = rng.integers(-20, 20, size=(cout, per_group, k, k))
        w, w_zero = (w.astype(np.int8), np.zeros(cout, np.int8)) if signed_weights else \
            ((w + 128).astype(np.uint8), np.full(cout, 128, np.uint8))
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.full(cout, 0.01, np.float32), f"ws{i}"),
                  numpy_helper.from_array(w_zero, f"wz{i}"),
                  numpy_helper.from_array(np.zeros(cout, np.int32), f"b{i}")]
        nodes.append(helper.make_node(
            "QLinearConv", [x, "a_scale", "a_zp", f"w{i}", f"ws{i}", f"wz{i}", "a_scale", "a_zp",
                            f"b{i}"], [f"y{i}"], kernel_shape=[k, k], strides=[stride, stride],
            pads=[k // 2] * 4, group=cin if depthwise else 1, name=f"conv{i}"))
        h = (h + 2 * (k // 2) - k) // stride + 1
        layer_macs = cout * h * h * per_group * k * k
        macs += layer_macs
        dw_macs += layer_macs if depthwise else 0
        x = f"y{i}"
    graph = helper.make_graph(
        nodes, "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, specs[0][0], size, size])],
        [helper.make_tensor_value_info(x, TensorProto.UINT8, [1, specs[-1][1], h, h])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return model, macs, dw_macs


def matmul_chain(layers: int, m: int, k: int) -> tuple[onnx.ModelProto, int]:
    """Build a chain of MatMulInteger + requantize-free casts; return it and its MACs."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(
            rng.integers(-20, 20, size=(k, k)).astype(np.int8), f"w{i}"))
        nodes.append(helper.make_node("MatMulInteger", [x, f"w{i}"], [f"acc{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Cast", [f"acc{i}"], [f"y{i}"], to=TensorProto.UINT8))
        x = f"y{i}"
    graph = helper.make_graph(
        nodes, "matmul_chain", [helper.make_tensor_value_info("x", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info(x, TensorProto.UINT8, [m, k])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), layers * m * k * k


def _session(model: onnx.ModelProto, threads: int | None) -> tuple[Any, dict[str, np.ndarray]]:
    """An ONNX Runtime session (full optimization) of `model` and a random feed for it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    rng = np.random.default_rng(0)
    feed = {inp.name: rng.standard_normal(inp.shape).astype(np.float32) if inp.type == "tensor(float)"
            else rng.integers(0, 255, size=inp.shape).astype(np.uint8)}
    return session, feed


def _median_run(session: Any, feed: dict[str, np.ndarray], seconds: float) -> float:
    """Median seconds per run over `seconds` (at least 5 runs), after 2 untimed runs."""
    for _ in range(2):
        session.run(None, feed)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_models(models: dict[str, onnx.ModelProto], threads: int | None, seconds: float,
                rounds: int = 3, advance: Any = None) -> dict[str, float]:
    """Each model's fastest median seconds per run over `rounds` interleaved turns of
    `seconds / rounds`: another process on the machine can only slow a turn down, so the
    fastest turn is this CPU's own speed. `advance()` is called after each model's last turn."""
    sessions = {name: _session(model, threads) for name, model in models.items()}
    best = dict.fromkeys(models, float("inf"))
    for turn in range(rounds):
        for name, (session, feed) in sessions.items():
            best[name] = min(best[name], _median_run(session, feed, seconds / rounds))
            if advance is not None and turn == rounds - 1:
                advance()
    return best


def _gops(macs: int | float, seconds: float) -> float:
    """Giga-operations per second (2 per multiply-accumulate) of `macs` done in `seconds`."""
    return 2 * macs / seconds / 1e9


def dense_gops(threads: int | None, seconds: float = 1.5, size: int = 56) -> float:
    """This CPU's dense int8 conv rate now, in GOPS, measured as `measure_host` measures it for
    `int8_tops`: comparing it with a calibrated profile's rate tells whether the machine has
    become slower (or faster) since it was calibrated."""
    model, macs, _ = conv_net(RESNET_LIKE, size)
    return _gops(macs, time_models({"dense": model}, threads, seconds)["dense"])


def dram_bandwidth(mbytes: int = 256, repeats: int = 5) -> float:
    """Return DRAM bandwidth in GB/s from a numpy copy (bytes read + bytes written per second)."""
    src = np.ones(mbytes * (1 << 20) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def measure_host(threads: int | None = None, quick: bool = False,
                 progress: bool = False) -> dict[str, Any]:
    """Run the micro-benchmarks and return the raw measurements (GOPS, GB/s, us per layer).

    `quick` shortens every benchmark (for tests); `progress` draws a progress bar.
    """
    from hatcli.deploy import host_graphs
    from hatcli.deploy.compile import lower_graph

    seconds = 0.3 if quick else 1.5
    size = 28 if quick else 56
    dense, dense_macs, _ = conv_net(RESNET_LIKE, size)
    depthwise, dw_macs, _ = conv_net(DEPTHWISE, size // 2)
    mm, mm_macs = matmul_chain(4, 128 if quick else 512, 512)
    small, small_macs, _ = conv_net([(64, 64, 1, 1, False)] * 64, 14)
    stem3, stem3_macs, stem3_out = host_graphs.stem_conv(4 * size)
    stem7, stem7_macs, stem7_out = host_graphs.stem_conv(4 * size, kernel=7, cout=64)
    head, head_macs = host_graphs.output_conv(64, size, 80)
    chain = (8, 64, size)
    elements = chain[0] * chain[1] * size * size  # outputs of the adds / tables in each chain
    steps = [("dense", dense), ("depthwise", depthwise), ("matmul", mm), ("small", small),
             ("stem3", lower_graph(stem3)), ("stem7", lower_graph(stem7)), ("output_conv", lower_graph(head)),
             ("pointwise", lower_graph(host_graphs.pointwise_chain(*chain).model())),
             ("residual", lower_graph(host_graphs.residual_chain(*chain).model())),
             ("pointwise_signed", lower_graph(host_graphs.pointwise_chain(*chain, relu=False).model())),
             ("table", lower_graph(host_graphs.table_chain(*chain).model()))]
    bar = make_progress() if progress else None
    task = bar.add_task("calibrating host", total=len(steps) + 1) if bar else None
    if bar:
        bar.start()
    try:
        times = time_models(dict(steps), threads, seconds,
                            advance=(lambda: bar.advance(task)) if bar and task is not None else None)
        bandwidth = dram_bandwidth(64 if quick else 256)
        if bar and task is not None:
            bar.advance(task)
    finally:
        if bar:
            bar.stop()
    dense_rate = _gops(dense_macs, times["dense"])
    # narrow-input convs: time = MACs / rate + outputs * ns, solved from the 3x3 and 7x7 stems
    a = np.array([[stem3_macs, stem3_out], [stem7_macs, stem7_out]], dtype=np.float64)
    per_mac, per_output = np.linalg.solve(a, np.array([times["stem3"], times["stem7"]]))
    if per_mac <= 0 or per_output < 0:  # noisy: one rate for both
        per_mac, per_output = (times["stem3"] + times["stem7"]) / (stem3_macs + stem7_macs), 0.0
    return {
        "dense_gops": dense_rate,
        "depthwise_gops": _gops(dw_macs, times["depthwise"]),
        "matmul_gops": _gops(mm_macs, times["matmul"]),
        # 64 small 1x1 convs, each split across the threads: what is left after their MACs
        "per_layer_us": max(0.0, times["small"] - 2 * small_macs / (dense_rate * 1e9)) / 64 * 1e6,
        "narrow_input_gops": _gops(1, per_mac),
        "narrow_input_ns": per_output * 1e9,
        "output_conv_gops": _gops(head_macs, times["output_conv"]),
        "elementwise_ns": max(0.0, times["residual"] - times["pointwise"]) / elements * 1e9,
        "table_ns": max(0.0, times["table"] - times["pointwise_signed"]) / elements * 1e9,
        "dram_gbytes_per_s": bandwidth,
        "threads": threads,
        "quick": quick,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def profile_from_measurement(measured: dict[str, Any]) -> MarchProfile:
    """Return the `host` profile with its cost model replaced by `measured` numbers.

    int8_tops is the measured dense QLinearConv rate, so `utilisation` is 1.0 by construction and
    `depthwise_utilisation` is the depthwise rate relative to it.
    """
    base = load_march("host")
    dense = max(float(measured["dense_gops"]), 1e-3)

    def share(key: str) -> float:
        return min(1.0, max(1e-4, float(measured[key]) / dense))

    cost = base.cost.model_copy(update={
        "utilisation": 1.0,
        "depthwise_utilisation": share("depthwise_gops"),
        "narrow_input_utilisation": share("narrow_input_gops"),
        "narrow_input_ns_per_element": float(measured.get("narrow_input_ns", 0.0)),
        "output_conv_utilisation": share("output_conv_gops"),
        "elementwise_ns_per_element": float(measured["elementwise_ns"]),
        "table_ns_per_element": float(measured["table_ns"]),
        "ddr_gbytes_per_s": max(0.1, float(measured["dram_gbytes_per_s"])),
        "per_layer_overhead_us": max(0.0, float(measured["per_layer_us"])),
    })
    desc = (f"{base.description} Calibrated on this machine: dense int8 conv "
            f"{dense:.1f} GOPS, depthwise {measured['depthwise_gops']:.1f} GOPS, DRAM "
            f"{measured['dram_gbytes_per_s']:.1f} GB/s ({measured.get('measured_at', '')}).")
    return base.model_copy(update={"int8_tops": dense / 1e3, "cost": cost, "description": desc})


def read_cache(cache_path: Path | None = None, threads: int | None = None,
               quick: bool = False) -> dict[str, Any] | None:
    """Return the cached measurement when it exists and matches this machine, else None."""
    path = cache_path or default_cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != host_fingerprint(threads, quick):
        return None
    return data.get("measured")


def calibrate_host(cache_path: Path | None = None, threads: int | None = None, force: bool = False,
                   quick: bool = False, progress: bool = False) -> MarchProfile:
    """Return the `host` profile calibrated on this machine (cached; `force` re-measures).

    Takes a few seconds on first use (`quick` shortens it, for tests); later calls read the
    JSON cache at `cache_path` (default `default_cache_path()`).
    """
    path = cache_path or default_cache_path()
    measured = None if force else read_cache(path, threads, quick)
    if measured is None:
        measured = measure_host(threads, quick=quick, progress=progress)
        try:
            atomic_write_json(path, {"fingerprint": host_fingerprint(threads, quick), "measured": measured})
        except OSError:
            pass  # a read-only home still gets a calibrated profile, just not cached
    return profile_from_measurement(measured)


def host_march(cache_path: Path | None = None, threads: int | None = None) -> MarchProfile:
    """Return the calibrated host profile when a calibration is cached, else the shipped default."""
    measured = read_cache(cache_path, threads)
    return profile_from_measurement(measured) if measured is not None else load_march("host")
