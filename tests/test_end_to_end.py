"""One real run of the whole chain on tiny data: every stage, every artifact, agreement."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest


@pytest.mark.slow
def test_run_the_whole_chain_on_tiny_data(hat, tiny_recipe, tiny_shapes, tmp_path):
    result = hat("run", tiny_recipe, "--json")
    assert result.code == 0, result.err
    rows = {row["stage"]: row for row in result.json()}
    assert list(rows) == ["pack", "float", "calibration", "qat", "int_infer", "export", "check (nash_e)",
                          "compile (nash_e -O3)", "perf", "deploy"]
    assert rows["check (nash_e)"]["values"]["supported"] is True
    assert rows["perf"]["values"]["host_ms"] > 0 and rows["perf"]["values"]["estimated_ms"] > 0
    # deploy runs the compiled artifact on ONNX Runtime and must agree with the integer program
    assert rows["deploy"]["values"]["top1"] == pytest.approx(rows["int_infer"]["values"]["top1"], abs=100 / 32)

    runs = tmp_path / "runs" / "tiny"
    for path in ["float/checkpoint-best.pt", "float/recipe.toml", "float/metrics.jsonl", "calibration/checkpoint.pt",
                 "qat/checkpoint-best.pt", "export/model.pt2", "export/model.onnx", "export/manifest.json",
                 "compile/nash_e-O3/model.onnx", "compile/nash_e-O3/manifest.json", "compile/nash_e-O3/perf.json",
                 "summary.json"]:
        assert (runs / path).exists(), path

    # a second run reuses every stage
    again = hat("run", tiny_recipe, "--json")
    assert again.code == 0, again.err
    reused = {row["stage"]: row["reused"] for row in again.json()}
    assert all(reused[s] for s in ("float", "calibration", "qat", "int_infer", "export", "compile (nash_e -O3)"))

    # eval --json has the documented shape, and deploy equals int_infer per image
    evals = {}
    for stage in ("float", "calibration", "qat", "int_infer", "deploy"):
        out = hat("eval", tiny_recipe, "--stage", stage, "--json")
        assert out.code == 0, out.err
        evals[stage] = out.json()
        assert set(evals[stage]) == {"stage", "metrics"} and set(evals[stage]["metrics"]) == {"top1", "top5"}
        assert 0 <= evals[stage]["metrics"]["top1"] <= 100

    # --compare runs several stages on the same images and reports their agreement
    compared = hat("eval", tiny_recipe, "--stage", "deploy", "--compare", "qat,int_infer", "--json")
    assert compared.code == 0, compared.err
    report = compared.json()
    assert report["stages"]["deploy"] == evals["deploy"]["metrics"]
    assert report["stages"]["int_infer"] == evals["int_infer"]["metrics"]
    pairs = {(p["a"], p["b"]): p for p in report["agreement"]}
    assert set(pairs) == {("deploy", "qat"), ("deploy", "int_infer"), ("qat", "int_infer")}
    assert all(p["images"] == 32 and 0 <= p["top1_agreement"] <= 100 for p in pairs.values())
    assert report["output_step"]["min"] > 0  # the last linear's int32 accumulator step
    assert pairs[("deploy", "int_infer")]["max_diff_steps"] >= 0
    bad = hat("eval", tiny_recipe, "--stage", "deploy", "--compare", "qatt")
    assert bad.code == 2 and "--compare takes stages" in bad.err

    # the exported files load without project code (torchao only registers the quantize ops)
    code = (
        "import torch, torchao, onnxruntime as ort, numpy as np, sys\n"
        "m = torch.export.load(sys.argv[1]).module()\n"
        "x = torch.randn(3, 3, 32, 32)\n"
        "s = ort.InferenceSession(sys.argv[2])\n"
        "a = m(x).detach().numpy(); b = s.run(None, {'image': x.numpy()})[0]\n"
        "print(float(np.abs(a - b).max()), float(np.abs(a).max()))\n"
    )
    env_free = subprocess.run([sys.executable, "-I", "-c", code, str(runs / "export/model.pt2"),
                               str(runs / "export/model.onnx")], capture_output=True, text=True, check=True)
    diff, scale = map(float, env_free.stdout.split())
    assert diff <= 0.05 * max(scale, 1e-3)

    exported = json.loads((runs / "export/manifest.json").read_text())
    assert exported["output_spec"] == [{"name": "logits", "shape": ["N", 6], "dtype": "float32"}]
    assert exported["input"]["shape"] == ["N", 3, 32, 32] and exported["kind"] == "classification"

    # the compiled artifact runs on onnxruntime alone and matches the export
    manifest = json.loads((runs / "compile/nash_e-O3/manifest.json").read_text())
    assert manifest["march"] == "nash_e" and manifest["opt"] == 3
    session = ort.InferenceSession(str(runs / "compile/nash_e-O3/model.onnx"))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    compiled = session.run(None, {"image": x})[0]
    reference = ort.InferenceSession(str(runs / "export/model.onnx"),
                                     providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.abs(compiled - reference).max() <= 0.05 * np.abs(reference).max()

    # infer draws a picture; calops counts
    picture = tmp_path / "pred.png"
    sample = next(tiny_shapes.glob("raw/val/*/*.jpg"))
    out = hat("infer", tiny_recipe, "--input", sample, "--out", picture, "--json")
    assert out.code == 0, out.err
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(out.json()["predictions"]) == 5
    ops = hat("calops", tiny_recipe, "--json")
    assert ops.code == 0 and ops.json()["macs"] > 0 and ops.json()["flops"] == 2 * ops.json()["macs"]
    # the integer program computes the same convolutions and matmuls as the float network
    int_ops = hat("calops", tiny_recipe, "--stage", "int_infer", "--json")
    assert int_ops.code == 0, int_ops.err
    assert int_ops.json()["macs"] == ops.json()["macs"], (int_ops.json()["flops_by_op"], ops.json()["flops_by_op"])
    assert int_ops.json()["params"] == ops.json()["params"]

    # a tampered artifact is refused
    (runs / "compile/nash_e-O3/model.onnx").write_bytes(b"tampered")
    refused = hat("eval", tiny_recipe, "--stage", "deploy")
    assert refused.code == 1 and "sha256" in refused.err.lower()
