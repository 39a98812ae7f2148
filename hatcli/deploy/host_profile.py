"""Calibrate the `host` march: measure this CPU's int8 throughput through ONNX Runtime and its
DRAM bandwidth, and return a `MarchProfile` whose cost model uses the measured numbers.

Micro-benchmarks (each a small ONNX graph built here, run with ONNX Runtime's CPU provider):
- dense: 3x3 QLinearConv layers at ResNet-like channel counts and resolutions (uint8
  activations, int8 per-channel weights, as ONNX Runtime runs our QDQ artifacts) -> GOPS;
- depthwise: 3x3 depthwise QLinearConv layers (256 channels, 28x28) -> depthwise GOPS;
- matmul: a chain of MatMulInteger -> GOPS (reported; the profile uses the conv figure);
- tiny: a chain of 1x1 QLinearConv on an 8x4x4 tensor -> fixed cost per layer;
- DRAM: numpy copy of a 256 MiB buffer (bytes read + written per second).

The result is cached as JSON in `~/.cache/hatcli/host_profile.json` (`$XDG_CACHE_HOME` honoured),
keyed by CPU model, core count, thread count and ONNX Runtime version.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hatcli.progress import make_progress
from hatcli.quant.march import MarchProfile, load_march

CACHE_VERSION = 1


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


def fingerprint(threads: int | None, quick: bool = False) -> dict[str, Any]:
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
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "a_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "a_zp")]
    nodes, x, h = [], "x", size
    macs = dw_macs = 0
    for i, (cin, cout, k, stride, depthwise) in enumerate(specs):
        per_group = 1 if depthwise else cin
        w = rng.integers(-20, 20, size=(cout, per_group, k, k)).astype(np.int8)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.full(cout, 0.01, np.float32), f"ws{i}"),
                  numpy_helper.from_array(np.zeros(cout, np.int8), f"wz{i}"),
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


def time_model(model: onnx.ModelProto, threads: int | None, seconds: float) -> float:
    """Return the median seconds per run of `model` with ONNX Runtime (full optimization)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    feed = {inp.name: np.random.default_rng(0).integers(0, 255, size=inp.shape).astype(np.uint8)}
    for _ in range(3):
        session.run(None, feed)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    seconds = 0.3 if quick else 1.5
    size = 28 if quick else 56
    dense, dense_macs, _ = conv_net(RESNET_LIKE, size)
    depthwise, dw_macs, _ = conv_net(DEPTHWISE, size // 2)
    mm, mm_macs = matmul_chain(4, 128 if quick else 512, 512)
    tiny, _, _ = conv_net([(8, 8, 1, 1, False)] * 64, 4)
    times: dict[str, float] = {}
    steps = [("dense", dense), ("depthwise", depthwise), ("matmul", mm), ("tiny", tiny)]
    bar = make_progress() if progress else None
    task = bar.add_task("calibrating host", total=len(steps) + 1) if bar else None
    if bar:
        bar.start()
    try:
        for name, model in steps:
            times[name] = time_model(model, threads, seconds)
            if bar and task is not None:
                bar.advance(task)
        bandwidth = dram_bandwidth(64 if quick else 256)
        if bar and task is not None:
            bar.advance(task)
    finally:
        if bar:
            bar.stop()
    return {
        "dense_gops": 2 * dense_macs / times["dense"] / 1e9,
        "depthwise_gops": 2 * dw_macs / times["depthwise"] / 1e9,
        "matmul_gops": 2 * mm_macs / times["matmul"] / 1e9,
        "per_layer_us": times["tiny"] / 64 * 1e6,
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
    cost = base.cost.model_copy(update={
        "utilisation": 1.0,
        "depthwise_utilisation": min(1.0, max(1e-4, float(measured["depthwise_gops"]) / dense)),
        "ddr_gbytes_per_s": max(0.1, float(measured["dram_gbytes_per_s"])),
        "per_layer_overhead_us": max(0.0, float(measured["per_layer_us"])),
    })
    desc = (f"{base.description} Calibrated on this machine: dense int8 conv "
            f"{dense:.1f} GOPS, depthwise {measured['depthwise_gops']:.1f} GOPS, DRAM "
            f"{measured['dram_gbytes_per_s']:.1f} GB/s ({measured.get('measured_at', '')}).")
    return base.model_copy(update={"int8_tops": dense / 1e3, "cost": cost, "description": desc})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_cache(cache_path: Path | None = None, threads: int | None = None,
               quick: bool = False) -> dict[str, Any] | None:
    """Return the cached measurement when it exists and matches this machine, else None."""
    path = cache_path or default_cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint(threads, quick):
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
            _write_json(path, {"fingerprint": fingerprint(threads, quick), "measured": measured})
        except OSError:
            pass  # a read-only home still gets a calibrated profile, just not cached
    return profile_from_measurement(measured)


def host_march(cache_path: Path | None = None, threads: int | None = None) -> MarchProfile:
    """Return the calibrated host profile when a calibration is cached, else the shipped default."""
    measured = read_cache(cache_path, threads)
    return profile_from_measurement(measured) if measured is not None else load_march("host")
