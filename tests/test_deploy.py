"""Deploy layer: march profiles, ONNX graph walking, check, perf, compile, runtime, calops."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hatcli.deploy.calops import count_ops
from hatcli.deploy.check import check_model
from hatcli.deploy.compile import compile_model
from hatcli.deploy.host_profile import calibrate_host, read_cache
from hatcli.deploy.onnx_graph import read_graph
from hatcli.deploy.perf import estimate_latency, measure_latency
from hatcli.deploy.runtime import load_artifact
from hatcli.errors import ArtifactError, UsageError
from hatcli.quant.march import SHIPPED_MARCHES as MARCH_NAMES, MarchProfile, load_march


class TinyCNN(nn.Module):
    """conv-bn-relu, depthwise, pointwise, residual add, global pool, linear (+ optional extras)."""

    def __init__(self, bad: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.group = nn.Conv2d(16, 16, 3, 1, 1, groups=4) if bad else nn.Identity()
        self.fc = nn.Linear(16, 10)
        self.bad = bad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.pw(torch.relu(self.dw(x)))) + x
        x = self.group(x)
        x = self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        return torch.softmax(x, dim=1) if self.bad else x


def export(model: nn.Module, path: Path) -> Path:
    """torch.export with a dynamic batch, then the dynamo ONNX exporter (as `hat export` does)."""
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        torch.onnx.export(ep, (x,), str(path), dynamo=True)
    return path


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export(TinyCNN(), tmp_path_factory.mktemp("plain") / "model.onnx")


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export(TinyCNN(bad=True), tmp_path_factory.mktemp("bad") / "model.onnx")


def qdq_model(path: Path, act: int = TensorProto.INT8, middle: str | None = None) -> Path:
    """Hand-built QDQ graph: Q(x) -> DQ -> Conv(DQ(int8 W)) -> Q(act) -> DQ [-> middle -> Q -> DQ]."""
    rng = np.random.default_rng(0)
    zp_dtype = {TensorProto.INT8: np.int8, TensorProto.INT16: np.int16}[act]
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "zp8"),
        numpy_helper.from_array(np.array(0, zp_dtype), "zpa"),
        numpy_helper.from_array(rng.integers(-50, 50, (8, 3, 3, 3)).astype(np.int8), "w"),
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(8, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp8"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp8"], ["xd"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0, name="dq_w"),
        helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("QuantizeLinear", ["c", "s", "zpa"], ["cq"], name="q_c"),
        helper.make_node("DequantizeLinear", ["cq", "s", "zpa"], ["y"], name="dq_c"),
    ]
    if middle:
        nodes += [helper.make_node(middle, ["y"], ["m"], name="middle"),
                  helper.make_node("QuantizeLinear", ["m", "s", "zp8"], ["mq"], name="q_m"),
                  helper.make_node("DequantizeLinear", ["mq", "s", "zp8"], ["out"], name="dq_m")]
    out = "out" if middle else "y"
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return path


# -- march profiles ------------------------------------------------------------------------

@pytest.mark.parametrize("name", MARCH_NAMES)
def test_every_march_loads(name: str) -> None:
    march = load_march(name)
    assert isinstance(march, MarchProfile) and march.name == name
    assert march.int8_tops > 0 and march.cost.ddr_gbytes_per_s > 0 and march.sources
    assert {"Conv", "Gemm", "Add", "QuantizeLinear", "DequantizeLinear"} <= set(march.ops)
    assert march.estimated == (name != "host")


def test_march_rules_from_public_figures() -> None:
    tops = {m: load_march(m).int8_tops for m in ("bayes", "nash_e", "nash_m", "nash_p")}
    assert tops == {"bayes": 128, "nash_e": 80, "nash_m": 128, "nash_p": 560}
    assert "Softmax" not in load_march("bayes").ops and "Softmax" in load_march("nash_m").ops
    assert not load_march("nash_e").quant.float_output and load_march("bayes").quant.float_output
    assert load_march("host").quant.activation_dtypes == ["int8"]
    assert load_march("bayes").quant.allow_int16


# -- graph walking -------------------------------------------------------------------------

def test_graph_layers_macs_and_fusion(plain: Path) -> None:
    graph = read_graph(plain, batch=3)
    ops = [(layer.op_type, layer.fused) for layer in graph.layers]
    assert ("Conv", ["Relu"]) in ops and ("Add", []) in ops
    stem = graph.layers[0]
    assert stem.output_shapes == [(3, 16, 16, 16)]
    assert stem.macs == 3 * 16 * 16 * 16 * 3 * 3 * 3
    dw = next(layer for layer in graph.layers if layer.is_depthwise)
    assert dw.macs == 3 * 16 * 16 * 16 * 9
    assert not graph.quantized


def test_graph_folds_qdq(tmp_path: Path) -> None:
    graph = read_graph(qdq_model(tmp_path / "q.onnx", middle="Relu"))
    assert graph.quantized
    assert [(layer.op_type, layer.fused) for layer in graph.layers] == [("Conv", ["Relu"])]
    conv = graph.layers[0]
    assert conv.float_fused == []  # the Relu reads the requantized int8 tensor
    assert conv.input_dtypes == ["int8"] and conv.output_dtype == "int8" and conv.weight_dtype == "int8"
    assert conv.quantized and conv.const_bytes == 8 * 3 * 3 * 3


# -- check ---------------------------------------------------------------------------------

def test_check_passes_plain_cnn(plain: Path) -> None:
    for name in ("bayes", "nash_e", "nash_m", "nash_p"):
        report = check_model(plain, load_march(name))
        assert report.supported and report.fallbacks == 0, report.to_dict()
        assert not {"QuantizeLinear", "DequantizeLinear"} & {r.op_type for r in report.rows}
    # the global pool is a ReduceMean over H and W: the compiler fuses it into QLinearGlobalAveragePool
    assert check_model(plain, load_march("host")).supported


class _ChannelMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)


def test_check_on_host_runs_only_a_spatial_mean_in_integers(tmp_path: Path) -> None:
    model = export(_ChannelMean(), tmp_path / "model.onnx")
    report = check_model(model, load_march("host"))
    assert report.fallback_ops() == {"ReduceMean": 1}
    assert "only a mean over H and W" in report.rows[0].reason
    assert check_model(model, load_march("nash_e")).supported


def test_check_flags_softmax_and_group_conv_on_bayes(bad: Path) -> None:
    report = check_model(bad, load_march("bayes"))
    assert not report.supported and report.fallbacks == 2
    reasons = {r.op_type: r.reason for r in report.rows if r.status == "CPU fallback"}
    assert "Softmax" in reasons["Softmax"]
    assert "4 channels per group" in reasons["Conv"]
    assert set(report.to_dict()) >= {"rows", "fallbacks", "supported"}
    nash = check_model(bad, load_march("nash_m"))
    assert [r.op_type for r in nash.rows if r.status != "BPU"] == ["Conv"]


def test_check_dtypes_in_qdq_graph(tmp_path: Path) -> None:
    int16 = qdq_model(tmp_path / "i16.onnx", act=TensorProto.INT16)
    assert check_model(int16, load_march("bayes")).supported
    host = check_model(int16, load_march("host"))
    assert host.fallbacks == 1 and "int16" in host.rows[0].reason
    erf = check_model(qdq_model(tmp_path / "erf.onnx", middle="Erf"), load_march("bayes"))
    assert [(r.op_type, r.status) for r in erf.rows] == [("Conv", "BPU"), ("Erf", "CPU fallback")]
    nash_e = check_model(int16, load_march("nash_e"))
    assert nash_e.supported and "int32" not in nash_e.rows[0].reason


def test_check_flags_float_island(tmp_path: Path) -> None:
    path = qdq_model(tmp_path / "f.onnx", middle="Relu")
    model = onnx.load(path)
    keep = [n for n in model.graph.node if n.name not in ("q_c", "dq_c")]
    for n in keep:
        n.input[:] = ["c" if i == "y" else i for i in n.input]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    onnx.save(model, path)
    report = check_model(path, load_march("bayes"))
    assert report.rows[0].fused == ["Relu"] and report.supported  # DQ->Conv->Relu->Q is one op
    report = check_model(path, load_march("host"))
    assert report.supported


# -- perf ----------------------------------------------------------------------------------

def test_estimate_fields_positive(plain: Path) -> None:
    est = estimate_latency(plain, load_march("bayes"), batch=4)
    d = est.to_dict()
    for key in ("latency_ms", "fps", "total_macs", "ddr_bytes_per_frame", "ops_per_frame"):
        assert d[key] > 0, key
    assert est.estimated and est.batch == 4
    # the layers' shares and the fitted per-frame cost (input, dispatch, output) make up the total
    frame_share = 100 * load_march("bayes").cost.fitted.latency_ms.get("frame", 0.0) * 4 / est.latency_ms
    assert abs(sum(layer.percent for layer in est.layers) + frame_share - 100) < 0.5
    assert est.total_macs == sum(layer.macs for layer in read_graph(plain, batch=4).layers)
    # nash_p carries nash_e's fit with its MAC terms scaled by 80/560 TOPS: faster on any conv net
    faster = estimate_latency(plain, load_march("nash_p"), batch=4)
    assert faster.latency_ms < estimate_latency(plain, load_march("nash_e"), batch=4).latency_ms


def test_measure_latency(plain: Path) -> None:
    m = measure_latency(plain, batch=2, warmup=1, runs=5, threads=1)
    assert m.median_ms > 0 and m.p90_ms >= m.median_ms * 0.5 and m.fps > 0 and m.runs == 5
    assert not m.to_dict()["estimated"]


# -- compile / runtime ---------------------------------------------------------------------

def test_compile_opt0_and_opt3_agree(plain: Path, tmp_path: Path) -> None:
    spec = {"name": "x", "shape": ["N", 3, 32, 32], "dtype": "float32"}
    a0 = compile_model(plain, load_march("bayes"), 0, tmp_path / "a0", spec, {"task": "t"})
    a3 = compile_model(plain, load_march("host"), 3, tmp_path / "a3", spec)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    r0, r3 = load_artifact(a0), load_artifact(a3)
    assert np.allclose(r0.run(x)[0], r3.run(x)[0], atol=1e-4)
    m3 = json.loads((a3 / "manifest.json").read_text())
    assert m3["opt"] == 3 and m3["session_graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert m3["saved_graph_optimization_level"] == "ORT_ENABLE_EXTENDED"
    from hatcli.plugins import runtimes

    qdq = {"model_qdq.onnx"} if any(runtimes().get(n).form == "qdq" for n in runtimes().names()) else set()
    assert set(m3["files"]) == {"model.onnx", "perf.json", "perf.html", "march.toml", *qdq}
    assert m3["input_spec"] == spec
    assert m3["outputs"][0]["shape"] == ["N", 10] and m3["versions"]["onnxruntime"]
    assert r0.manifest["extra"] == {"task": "t"} and r3.input_spec == spec
    perf0 = json.loads((a0 / "perf.json").read_text())
    perf3 = json.loads((a3 / "perf.json").read_text())
    assert perf0["estimate"]["estimated"] and perf0["measured"] is None
    assert perf3["measured"]["median_ms"] > 0 and not perf3["estimated"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    compile_model(plain, load_march("bayes"), 1, a0, spec)  # recompiling replaces an artifact
    assert json.loads((a0 / "manifest.json").read_text())["opt"] == 1


def test_perf_html_is_a_self_contained_report_of_perf_json(plain: Path, tmp_path: Path) -> None:
    art = compile_model(plain, load_march("bayes"), 3, tmp_path / "art", {"shape": [1, 3, 32, 32]})
    page = (art / "perf.html").read_text()
    perf = json.loads((art / "perf.json").read_text())
    estimate = perf["estimate"]
    assert page.startswith("<!doctype html>") and "<script" not in page and "http" not in page
    assert "estimated" in page and "Journey 5" in page  # a BPU figure says it is an estimate
    assert f"{estimate['latency_ms']:,.3f} ms" in page and f"{estimate['fps']:,.1f}" in page
    assert page.count("<rect ") == min(15, sum(1 for l in estimate["layers"] if l["time_us"] > 0))
    for layer in estimate["layers"]:  # the per-layer table lists every layer with its share of the time
        assert f"<td class='l'>{layer['name']}</td>" in page and f"<td>{layer['percent']:.2f}</td>" in page
    host = compile_model(plain, load_march("host"), 3, tmp_path / "host", {"shape": [1, 3, 32, 32]})
    assert "Measured on this host" in (host / "perf.html").read_text()


def test_runtime_refuses_tampered_artifact(plain: Path, tmp_path: Path) -> None:
    art = compile_model(plain, load_march("bayes"), 2, tmp_path / "art", {"shape": [1, 3, 32, 32]})
    with (art / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match="model.onnx"):
        load_artifact(art)
    assert ArtifactError.exit_code == 1


def test_runtime_bare_onnx(plain: Path) -> None:
    art = load_artifact(plain)
    assert art.manifest is None and art.input_spec["shape"] == ["N", 3, 32, 32]
    out = art.run(np.zeros((2, 3, 32, 32), np.float32))
    assert out[0].shape == (2, 10)
    with pytest.raises(UsageError):
        art.run(np.zeros((2, 3, 16, 16), np.float32))


def test_bad_opt_and_bad_file(plain: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--opt must be 0..3"):
        compile_model(plain, load_march("bayes"), 7, tmp_path / "o", {})
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \xff\xfe")
    with pytest.raises(UsageError, match="junk.onnx"):
        compile_model(junk, load_march("bayes"), 1, tmp_path / "o", {})
    with pytest.raises(UsageError, match="junk.onnx"):
        check_model(junk, load_march("bayes"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="refusing"):
        compile_model(plain, load_march("bayes"), 1, tmp_path / "busy", {})
    assert not (tmp_path / "o").exists()


# -- calops / host calibration -------------------------------------------------------------

def test_calops_matches_flop_counter() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 16, 16)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    report = count_ops(model, x)
    assert report.macs == counter.get_total_flops() // 2 == 2 * 16 * 16 * (8 * 27 + 4 * 8)
    assert report.device == "meta" and report.params == sum(p.numel() for p in model.parameters())
    assert [layer.macs for layer in report.layers] == [2 * 256 * 8 * 27, 0, 2 * 256 * 32]
    assert report.layers[0].output_shape == [2, 8, 16, 16] and report.to_dict()["layers"]
    assert next(model.parameters()).device.type == "cpu"


def test_calibrate_host_caches(tmp_path: Path) -> None:
    cache = tmp_path / "host_profile.json"
    profile = calibrate_host(cache_path=cache, quick=True)
    assert not profile.estimated and profile.int8_tops > 0 and profile.cost.ddr_gbytes_per_s > 0
    assert 0 < profile.cost.depthwise_utilisation <= 1
    measured = read_cache(cache, quick=True)
    assert measured is not None and measured["dense_gops"] > 0
    assert read_cache(cache) is None  # a quick calibration never stands in for a full one
    again = calibrate_host(cache_path=cache, quick=True)
    assert again.int8_tops == profile.int8_tops
