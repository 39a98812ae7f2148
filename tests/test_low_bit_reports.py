"""What the reports say about low-bit layers (docs/quant_schemes.md): the export records them
(manifest and ONNX metadata), `hat check` says per layer how the march runs them, `hat check`
explains without an export why an LQ-Net recipe cannot be deployed, and `hat calops` counts
bit-operations and weight memory at the trained bits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import pytest
import torch

from conftest import TINY_RECIPE
from hatcli.deploy.export import write_export
from hatcli.deploy.low_bit_check import METADATA_KEY, write_low_bit_records
from hatcli.quant.flow import convert_to_integer, set_mode
from hatcli.quant.low_bit.schemes import LQNET_NOT_INTEGER
from hatcli.quant.low_bit_records import low_bit_layers
from hatcli.recipe import load_recipe
from hatcli.stages import default_export_dir
from hatcli.workflows.stage_models import prepare_recipe_model

LSQ_W2A2 = 'scheme = "lsq"\nweight_bits = 2\nactivation_bits = 2'
INT8_STATEMENT = ("runs on the int8 datapath (input codes in [0, 3], weight codes in [-2, 1]); "
                  "exact, no low-bit speed-up on {where}")
# MobileNetV1 of the tiny recipe: 28 convs / linear; keep_first_last leaves the first conv and the classifier at int8
LOW_BIT = [f"features.{i}.{j}.0" for i in range(1, 14) for j in (0, 1)]


def _low_bit_recipe(folder: Path, data: Path, quant: str) -> Path:
    """The tiny recipe (tests/conftest.py) with `quant` added to its `[quant]` table."""
    text = TINY_RECIPE.format(work=folder / "runs", data=data)
    path = folder / "low_bit.toml"
    path.write_text(text.replace('[quant]\nmarch = "nash_e"', f'[quant]\nmarch = "nash_e"\n{quant}'))
    return path


def _flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def lsq_export(tmp_path_factory: pytest.TempPathFactory, tiny_shapes: Path) -> Path:
    """An lsq W2A2 tiny recipe whose export folder holds a calibrated (untrained) integer program:
    the records do not depend on training, and no checkpoint is written (calops needs none)."""
    recipe = _low_bit_recipe(tmp_path_factory.mktemp("lsq"), tiny_shapes, LSQ_W2A2)
    lr = load_recipe(recipe, [])
    torch.manual_seed(0)
    prepared, _ = prepare_recipe_model(lr, lr.family.build_float_model(lr.model, 4).eval())
    set_mode(prepared, "calibrate")
    with torch.no_grad():
        prepared(torch.randn(8, 3, 32, 32))
    integer = convert_to_integer(copy.deepcopy(prepared))  # the record survives a copy and conversion
    assert [r.module for r in low_bit_layers(integer)] == LOW_BIT
    write_export(lr, integer, ["a", "b", "c", "d"], "calibration", default_export_dir(lr))
    return recipe


def test_the_export_records_the_low_bit_layers_in_the_manifest_and_the_onnx_metadata(lsq_export):
    folder = lsq_export.parent / "runs" / "tiny" / "export"
    manifest = json.loads((folder / "manifest.json").read_text())
    records = manifest["low_bit_layers"]
    assert [r["module"] for r in records] == LOW_BIT
    assert all((r["scheme"], r["weight_bits"], r["activation_bits"], r["weight_groups"]) == ("lsq", 2, 2, 0)
               for r in records)
    assert all(r["weight_codes"] == [-2, 1] and r["activation_codes"] == [0, 3] for r in records)  # after ReLUs
    metadata = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert json.loads(metadata[METADATA_KEY]) == records


def test_a_model_without_low_bit_layers_gets_no_record(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(path))
    write_low_bit_records(str(path), [])
    assert not onnx.load(str(path)).metadata_props


def test_hat_check_says_each_low_bit_layer_runs_exactly_on_the_int8_datapath(hat, lsq_export):
    result = hat("check", lsq_export, "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert [v["module"] for v in report["low_bit_layers"]] == LOW_BIT
    first = report["low_bit_layers"][0]
    assert (first["trained"], first["runs_on"], first["exact"], first["speedup"]) == (
        "lsq W2A2", "int8 datapath", True, False)
    assert first["note"] == INT8_STATEMENT.format(where="nash_e (Journey 6E)")
    trained = {row["module"]: row["trained"] for row in report["rows"] if row["op_type"] in ("Conv", "Gemm")}
    assert trained["features.1.0"] == "lsq W2A2" and trained["features.0"] == "" and trained["classifier"] == ""

    table = _flat(hat("check", lsq_export).out)
    assert "trained" in table
    line = "low-bit features.13.1.0: lsq W2A2 — " + INT8_STATEMENT.format(where="nash_e (Journey 6E)")
    assert line in table


def test_hat_check_reads_the_record_back_from_the_onnx_file_alone(hat, lsq_export, tmp_path):
    model = tmp_path / "copy.onnx"
    model.write_bytes((lsq_export.parent / "runs" / "tiny" / "export" / "model.onnx").read_bytes())
    result = hat("check", "--model", model, "--march", "host", "--json")
    assert result.code == 0, result.err
    verdicts = result.json()["low_bit_layers"]
    assert len(verdicts) == len(LOW_BIT) and all(v["exact"] and not v["speedup"] for v in verdicts)
    assert verdicts[0]["note"].endswith("no low-bit speed-up on host (this CPU (ONNX Runtime CPUExecutionProvider))")


def test_hat_check_explains_without_an_export_why_an_lqnet_recipe_stops_at_qat(hat, tmp_path, tiny_shapes):
    recipe = _low_bit_recipe(tmp_path, tiny_shapes, 'scheme = "lqnet"\nweight_bits = 2\nactivation_bits = 2')
    result = hat("check", recipe, "--json")
    assert result.code == 1, result.err  # not deployable: the code of ops that fall back
    report = result.json()
    assert (report["deployable"], report["stops_at"]) == (False, "qat")
    assert [layer["module"] for layer in report["not_deployable"]] == LOW_BIT
    assert all(layer["reason"] == LQNET_NOT_INTEGER and layer["scheme"] == "lqnet"
               for layer in report["not_deployable"])
    table = hat("check", recipe)
    assert table.code == 1
    out = _flat(table.out)
    assert "not deployable" in out and f"stops at `hat eval {recipe} --stage qat`" in out
    assert _flat(LQNET_NOT_INTEGER) in out and "features.1.0.0" in out
    assert not (tmp_path / "runs").exists()  # nothing trained or exported


def test_hat_calops_counts_bops_and_weight_memory_at_the_trained_bits(hat, lsq_export):
    result = hat("calops", lsq_export, "--json")  # no checkpoint: the plan is resolved on random weights
    assert result.code == 0, result.err
    report = result.json()
    layers = [row for row in report["layers"] if row["macs"]]
    assert sorted(r["name"] for r in layers if r["scheme"] == "lsq") == sorted(LOW_BIT)
    for row in layers:
        bits = 2 if row["name"] in LOW_BIT else 8
        assert (row["weight_bits"], row["activation_bits"]) == (bits, bits), row
        assert row["bops"] == row["macs"] * bits * bits
        assert row["weight_bytes"] == row["weights"] * bits / 8
        assert row["weights"] > 0
    assert report["low_bit_layers"] == len(LOW_BIT) and report["macs_outside_layers"] == 0
    assert report["bops"] == sum(r["bops"] for r in layers)
    assert report["bops_int8"] == 64 * report["macs"] and report["bops_fp32"] == 1024 * report["macs"]
    weights = sum(r["weights"] for r in layers)
    assert report["weight_bytes"] == sum(r["weight_bytes"] for r in layers)
    assert (report["weight_bytes_int8"], report["weight_bytes_fp32"]) == (weights, 4 * weights)
    ratios = report["ratios"]
    assert ratios["bops_vs_int8"] == round(report["bops_int8"] / report["bops"], 3) > 4
    assert ratios["weight_memory_vs_fp32"] == round(4 * weights / report["weight_bytes"], 3) > 4
    out = _flat(hat("calops", lsq_export).out)
    assert "BOPs at the trained bits (26 low-bit layers, the rest int8)" in out and "weight memory" in out


def test_hat_calops_counts_a_march_recipe_at_int8(hat, tiny_recipe):
    report = hat("calops", tiny_recipe, "--json").json()
    assert report["low_bit_layers"] == 0 and report["bops"] == report["bops_int8"] == 64 * report["macs"]
    assert report["ratios"]["weight_memory_vs_int8"] == 1.0
