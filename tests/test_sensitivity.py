"""Per-layer sensitivity (`hat check --sensitivity`) and the int16 search (`hat train --auto-int16`)."""

from __future__ import annotations

import json
import shutil
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

from conftest import TINY_RECIPE
from hatcli.main import run_cli
from tiny_nets import TinyFamily, calibrate


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_recipe(folder: Path, data: Path) -> Path:
    path = folder / "tiny.toml"
    path.write_text(TINY_RECIPE.format(work=folder / "runs", data=data).replace("epochs = 2", "epochs = 1"))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_shapes: Path) -> Path:
    """A tiny recipe with its float (1 epoch) and calibration stages done, shared by the module.

    Calibration runs through `--auto-int16` with a drop it cannot miss: a normal calibration, no
    layer promoted (see `test_auto_int16_with_the_drop_already_small_promotes_nothing`).
    """
    recipe = _write_recipe(tmp_path_factory.mktemp("sensitivity"), tiny_shapes)
    assert run_cli(["train", str(recipe), "--stage", "float"]) == 0
    (recipe.parent / "original.toml").write_text(recipe.read_text())
    assert run_cli(["train", str(recipe), "--stage", "calibration", "--auto-int16", "--max-drop", "100"]) == 0
    return recipe


@pytest.fixture
def own_run(trained: Path, tmp_path: Path, tiny_shapes: Path) -> Path:
    """A copy of the trained float stage under this test's own work_dir (the search rewrites calibration)."""
    recipe = _write_recipe(tmp_path, tiny_shapes)
    shutil.copytree(trained.parent / "runs" / "tiny" / "float", tmp_path / "runs" / "tiny" / "float")
    return recipe


# -- which fake quants belong to which layer ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_prepared():
    from hatcli.quant.flow import prepare_quantized
    from hatcli.quant.march import load_march

    family = TinyFamily()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared, _ = prepare_quantized(family, family.build_float_model(None, 5).eval(), (16, 16),
                                        load_march("nash_e"), ["branch"])
    calibrate(prepared, [torch.randn(4, 3, 16, 16)])
    return prepared


def test_every_fake_quant_belongs_to_exactly_one_layer(tiny_prepared):
    from hatcli.quant.sensitivity import fake_quant_modules, find_layers

    layers = {layer.name: layer for layer in find_layers(tiny_prepared)}
    assert list(layers) == ["stem.0", "branch", "add", "head"]  # graph order
    owned = [m for layer in layers.values() for m in layer.modules]
    assert sorted(owned) == sorted(fake_quant_modules(tiny_prepared)) and len(set(owned)) == len(owned)
    # conv+ReLU: weight, output (after the fused ReLU, so int16 must name the ReLU) and the graph input
    assert len(layers["stem.0"].modules) == 3 and layers["stem.0"].op == "conv2d+relu"
    assert (layers["stem.0"].dtype, layers["stem.0"].int16_key) == ("uint8", "stem.2")
    assert (layers["branch"].dtype, layers["branch"].int16_key) == ("int16", "branch")  # the recipe asked
    assert layers["add"].op == "add+relu"
    assert (layers["head"].dtype, layers["head"].int16_key) == ("int32", None)  # accumulator is the output


def test_one_layer_alone_leaves_every_other_output_float(tiny_prepared):
    from hatcli.quant.flow import set_mode
    from hatcli.quant.sensitivity import enable_only, enabled_fake_quants, fake_quant_modules, find_layers

    set_mode(tiny_prepared, "eval")
    modules = fake_quant_modules(tiny_prepared)
    changed: dict[str, bool] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: changed.__setitem__(
        name, changed.get(name, False) or not torch.equal(args[0], out))) for name, m in modules.items()]
    try:
        for layer in find_layers(tiny_prepared):
            enable_only(tiny_prepared, layer.modules)
            assert sorted(enabled_fake_quants(tiny_prepared)) == sorted(layer.modules)
            changed.clear()
            with torch.no_grad():
                tiny_prepared(torch.randn(2, 3, 16, 16))
            assert {n for n, c in changed.items() if c} <= set(layer.modules), layer.name
            assert any(changed[n] for n in layer.modules), layer.name  # and this layer's are quantized
    finally:
        for hook in hooks:
            hook.remove()
    enable_only(tiny_prepared, [])
    assert enabled_fake_quants(tiny_prepared) == []


def test_rank_orders_by_drop_then_by_lower_sqnr():
    from hatcli.workflows.sensitivity import LayerSensitivity, rank

    def row(name, drop, sqnr):
        return LayerSensitivity(layer=name, op="conv2d", dtype="int8", drop=drop, sqnr_db=sqnr, metric=0.0)

    rows = [row("a", 0.0, 20.0), row("b", 1.0, 40.0), row("c", 0.0, 10.0), row("d", 1.0, 30.0), row("e", -1, 5)]
    assert [r.layer for r in rank(rows)] == ["d", "b", "c", "a", "e"]


# -- hat sensitivity ------------------------------------------------------------------------------


def test_sensitivity_json_ranks_every_quantized_layer(hat, trained):
    result = hat("sensitivity", trained, "--batches", "1", "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["recipe"] == str(trained) and report["metric"] == "top1"
    assert (report["batches"], report["images"]) == (1, 16)  # --batches caps the val set
    assert 0 <= report["reference"] <= 100
    layers = report["layers"]
    assert len(layers) == 28  # 27 conv+ReLU of MobileNetV1 and the classifier
    assert {"layer", "op", "dtype", "drop", "sqnr_db"} <= set(layers[0])
    keys = [(-row["drop"], row["sqnr_db"]) for row in layers]
    assert keys == sorted(keys)
    assert all(row["drop"] == pytest.approx(report["reference"] - row["metric"]) for row in layers)
    assert all(row["sqnr_db"] is not None and row["sqnr_db"] > 0 for row in layers)
    # one layer alone: its own 1-3 fake quants are on, the other layers' are off
    assert all(1 <= row["enabled"] <= 3 for row in layers)
    by_name = {row["layer"]: row for row in layers}
    assert by_name["features.0.0"]["enabled"] == 3  # weight, output and the graph input
    assert by_name["classifier"]["dtype"] == "int32" and by_name["features.1.0.0"]["dtype"] == "uint8"


def test_sensitivity_table_shows_the_ranking(hat, trained, monkeypatch):
    from hatcli.workflows import sensitivity

    rows = [sensitivity.LayerSensitivity("features.3.0.0", "conv2d+relu", "uint8", 0.0, 31.5, 50.0),
            sensitivity.LayerSensitivity("classifier", "linear", "int32", 1.5, 40.25, 48.5)]
    report = sensitivity.SensitivityReport(str(trained), "top1", 50.0, 1, 16, sensitivity.rank(rows))
    monkeypatch.setattr(sensitivity, "layer_sensitivity", lambda lr, batches=None: report)
    result = hat("sensitivity", trained)
    assert result.code == 0, result.err
    assert "rank" in result.out and "SQNR dB" in result.out and "16 val images" in result.out
    lines = [line for line in result.out.splitlines() if "classifier" in line or "features.3.0.0" in line]
    assert "classifier" in lines[0] and "+1.50" in lines[0] and "40.2" in lines[0]
    assert "features.3.0.0" in lines[1] and "31.5" in lines[1]
    assert "reference (every fake quant off): top1 50.00" in result.out


def test_sensitivity_without_calibration_says_how_to_make_it(hat, tmp_path, tiny_shapes):
    recipe = _write_recipe(tmp_path, tiny_shapes)
    result = hat("sensitivity", recipe)
    assert result.code == 1
    assert f"hat train {recipe} --stage calibration" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_sensitivity_needs_a_recipe(hat, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    assert hat("check", "--model", model, "--sensitivity").code == 2


# -- hat train --auto-int16 -----------------------------------------------------------------------


def test_the_first_set_that_fits_is_kept_else_the_smallest_drop():
    from hatcli.workflows.auto_int16 import Int16Step, choose

    steps = [Int16Step(i, [], [], 0.0, drop) for i, drop in enumerate([2.0, 0.4, 0.2, 0.9])]
    assert choose(steps, 0.5) == 1
    assert choose(steps, 0.1) == 2
    assert choose(steps[:1], 0.1) == 0


def test_auto_int16_on_a_march_without_int16_exits_2(hat, trained):
    stage_json = trained.parent / "runs/tiny/calibration/stage.json"
    before = stage_json.read_text()
    result = hat("train", trained, "--stage", "calibration", "--auto-int16", "--set", "quant.march=host")
    assert result.code == 2
    assert "`host`" in result.err and "nash_e" in result.err
    assert stage_json.read_text() == before  # refused before any calibration


def test_auto_int16_applies_to_calibration_only(hat, trained):
    assert hat("train", trained, "--stage", "qat", "--auto-int16").code == 2
    assert hat("train", trained, "--stage", "calibration", "--max-drop", "0.3").code == 2


def test_auto_int16_with_the_drop_already_small_promotes_nothing(trained):
    """The search stops after the normal calibration and still writes a recipe (with no new int16
    layer): the command always leaves the recipe it names, and that recipe resolves to the original."""
    from hatcli import stages
    from hatcli.recipe import load_recipe

    assert trained.read_text() == (trained.parent / "original.toml").read_text()  # never touched
    written = trained.with_name("tiny.int16.toml")
    text = written.read_text()
    assert "step 0: as given" in text and "step 1" not in text and "<- kept" in text
    assert tomllib.loads(text) == {"extends": "tiny.toml", "quant": {"int16": []}}
    kept = load_recipe(written)
    assert kept.resolved == load_recipe(trained).resolved
    assert stages.is_up_to_date(kept, "calibration") and stages.is_up_to_date(load_recipe(trained), "calibration")


def test_auto_int16_promotes_the_most_sensitive_layers_until_the_drop_fits(hat, own_run, monkeypatch):
    """Real calibrations; the measured top-1 is replaced by one that recovers as layers go int16
    (the tiny model's PTQ loses nothing), so the search must take exactly two steps."""
    from hatcli import stages
    from hatcli.quant import flow
    from hatcli.recipe import load_recipe
    from hatcli.workflows import stage_models, training

    real = training.calibrate
    seen: list[list[str]] = []

    def calibrate(lr, from_path=None):
        record = real(lr, from_path=from_path)
        seen.append(list(lr.recipe.quant.int16))
        penalty = {0: 2.0, 1: 1.0}.get(len(lr.recipe.quant.int16), 0.0)
        return {**record, "metrics": {**record["metrics"], "top1": 50.0 - penalty}}

    monkeypatch.setattr(training, "calibrate", calibrate)
    quantizers = []
    real_prepare = flow.prepare_quantized

    def prepare_quantized(*args, **kwargs):
        prepared, quantizer = real_prepare(*args, **kwargs)
        quantizers.append(quantizer)
        return prepared, quantizer

    monkeypatch.setattr(flow, "prepare_quantized", prepare_quantized)
    monkeypatch.setattr(stage_models, "evaluate_stage", lambda lr, stage: {"stage": stage, "metrics": {"top1": 50.0}})
    out_path = own_run.parent / "kept" / "mixed.toml"
    result = hat("train", own_run, "--stage", "calibration", "--auto-int16", "--max-drop", "0.5",
                 "--write-recipe", out_path, "--sensitivity-batches", "1", "--json")
    assert result.code == 0, result.err
    out = result.json()
    assert [s["drop"] for s in out["steps"]] == [2.0, 1.0, 0.0] and out["met"] is True and out["chosen"] == 2
    assert out["int16"] == out["order"][:2] and len(out["order"]) == 27  # every conv+ReLU output, not the classifier
    assert seen == [[], out["order"][:1], out["order"][:2]]  # re-calibrated once per step, in ranking order

    # the recipe kept: loads, extends the original, and its patterns name real module paths
    text = out_path.read_text()
    assert text.startswith("# Written by `hat train --auto-int16`") and "drop 1.00" in text
    data = tomllib.loads(text)
    assert data["extends"] == "../tiny.toml" and data["quant"]["int16"] == out["int16"]
    kept = load_recipe(out_path)
    assert kept.recipe.quant.int16 == out["int16"] and kept.recipe.task == "tiny"
    assert stages.is_up_to_date(kept, "calibration") and not stages.is_up_to_date(load_recipe(own_run), "calibration")
    # the last calibration (the one kept) computed exactly those modules' outputs in int16
    assert quantizers[-1].int16 == out["int16"] and sorted(quantizers[-1].int16_nodes) == sorted(out["int16"])
    assert json.loads((own_run.parent / "runs/tiny/calibration/stage.json").read_text())["fingerprint"] == \
        stages.stage_fingerprint(kept, "calibration")

    # a second search refuses to overwrite a file it did not write, and never the recipe itself
    assert hat("train", own_run, "--stage", "calibration", "--auto-int16", "--write-recipe", own_run).code == 2
    foreign = own_run.parent / "mine.toml"
    foreign.write_text("task = 'mine'\n")
    refused = hat("train", own_run, "--stage", "calibration", "--auto-int16", "--write-recipe", foreign)
    assert refused.code == 2 and "not written by --auto-int16" in refused.err
    assert foreign.read_text() == "task = 'mine'\n"
