"""`hat debug`: every stage of a run compared layer by layer on the same images, and the layer that
lost the accuracy named.

Two real runs feed the tests: a small classifier trained long enough that its outputs depend on
its input (about 25 s) and the tiny detector of the end-to-end tests (about 30 s). Faults are
planted in copies of them (tests/debug_faults.py): a checkpoint, the recipe or the compiled
artifact is edited, never hat.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE
from test_end_to_end_detection import DETECTION_RECIPE

import debug_faults as faults
from hatcli.main import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_STAGES = ["float", "calibration", "qat_float", "qat", "int_infer", "deploy"]
"""What `hat debug` compares by default on a run with every stage (qat_float: the default pair's reference)."""
SECTIONS = ["verdict", "summary", "first_divergence", "causes", "advice", "stages", "layers", "worst_inputs", "ranges",
            "weights", "quantization", "consistency"]


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MobileNetV1 (alpha 0.25) after a whole `hat run` on 800 shapes of 32x32, 8 float epochs."""
    from hatcli.data.shapes import pack_shapes
    from hatcli.family import PackRequest

    folder = tmp_path_factory.mktemp("debug_cls")
    pack_shapes(PackRequest(kind="shapes", target_data_dir=folder / "data", num_images=800, image_size=32, seed=3))
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(work=folder / "runs", data=folder / "data")
                      .replace("epochs = 2", "epochs = 8").replace("batch_size = 16", "batch_size = 32"))
    assert run_cli(["run", str(recipe), "--json"]) == 0
    return recipe


@pytest.fixture(scope="module")
def det_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FCOS-EfficientNet after a whole `hat run` on 60 generated shapes."""
    folder = tmp_path_factory.mktemp("debug_det")
    recipe = folder / "det.toml"
    recipe.write_text(DETECTION_RECIPE.format(work=folder / "runs", data=folder / "data"))
    assert run_cli(["run", str(recipe), "--json"]) == 0
    return recipe


def _debug(hat, recipe: Path, *args: str) -> dict:
    result = hat("debug", recipe, "--json", *args)
    assert result.code == 0, result.err
    return result.json()


@pytest.fixture(scope="module")
def cls_debug(cls_run: Path) -> dict:
    """`hat debug --json` of the classifier run, every stage, default options."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_cli(["debug", str(cls_run), "--json"]) == 0
    return json.loads(out.getvalue())


# -- the measures ------------------------------------------------------------------------------


def test_a_layer_is_compared_by_cosine_sqnr_l1_and_output_steps():
    from hatcli.workflows.debug_metrics import Agreement

    agreement = Agreement()
    reference = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    agreement.update(reference, reference + torch.tensor([[0.0, 0.5, 0.0, -0.5]]), torch.tensor(0.25))
    assert agreement.max_steps == 2.0 and agreement.l1 == 0.25  # the largest difference is two steps of 0.25
    assert agreement.sqnr_db == pytest.approx(10 * math.log10(30 / 0.5))
    assert 0.99 < agreement.cosine < 1


def test_an_output_is_judged_against_how_much_it_varies_not_its_offset():
    from hatcli.workflows.debug_metrics import OutputsAgreement

    varying = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    offset, nudged = OutputsAgreement(), OutputsAgreement()
    offset.update([varying + 100.0], [varying + 100.1])  # a large constant hides nothing
    nudged.update([varying], [varying + 0.1])
    assert offset.sqnr_db == pytest.approx(nudged.sqnr_db) == pytest.approx(10 * math.log10(2 / 0.02))


# -- reading layers changes nothing -------------------------------------------------------------


@pytest.mark.parametrize("run", ["cls_run", "det_run"])
def test_reading_every_layer_leaves_each_stage_s_outputs_bit_for_bit(run, request):
    from hatcli.engine.loaders import build_loader
    from hatcli.recipe import load_recipe
    from hatcli.workflows.compare import flat_outputs
    from hatcli.workflows.debug_stages import build_models

    lr = load_recipe(request.getfixturevalue(run))
    models = build_models(lr, ALL_STAGES)
    assert list(models.stages) == ALL_STAGES
    images, _ = next(iter(build_loader(lr, "val")))
    for stage, model in models.stages.items():
        with torch.no_grad():
            captured, layers = model.capture(images)
            plain = model.model(images)
        assert all(torch.equal(a, b) for a, b in zip(flat_outputs(captured), flat_outputs(plain), strict=True)), stage
        assert set(layers) == {layer.name for layer in models.layers}, stage  # every layer read, deploy included


def test_the_artifact_computes_every_layer_as_int_infer_does(cls_debug):
    consistency = {row["pair"]: row for row in cls_debug["consistency"]}
    assert consistency["int_infer vs deploy"]["first_over_1_step"] == "-"
    assert consistency["int_infer vs deploy"]["most_steps"] is None  # not one layer differs
    assert consistency["qat vs int_infer"]["layers"] == cls_debug["summary"]["layers"] == 28
    rows = {row["layer"]: row for row in cls_debug["layers"]}
    assert all(row["int_infer_sqnr_db"] == row["deploy_sqnr_db"] for row in rows.values())


# -- what debug.json holds ----------------------------------------------------------------------


def test_debug_json_has_every_section_most_important_first(cls_debug, cls_run):
    cls_debug = dict(cls_debug)
    path = Path(cls_debug.pop("path"))
    assert path == cls_run.parent / "runs" / "tiny" / "debug" / "debug.json"
    assert list(cls_debug) == SECTIONS
    assert json.loads(path.read_text()) == cls_debug  # --json prints what the file holds
    for key in SECTIONS:
        value = cls_debug[key]
        if isinstance(value, list):  # tables: flat rows, so `hat report` draws them as they are
            assert value and all(isinstance(row, dict) for row in value), key
            assert all(not isinstance(v, (dict, list)) for row in value for v in row.values()), key
    summary = cls_debug["summary"]
    assert summary["stages"] == ", ".join(ALL_STAGES) and summary["pair"] == "qat_float vs int_infer"
    assert summary["images"] == 64 and summary["capture_exact"] == "every stage"
    assert summary["quantized_stage"] == "qat" and summary["kind"] == "classification"
    layers = cls_debug["layers"]
    assert [row["index"] for row in layers] == list(range(28)) and layers[0]["inputs"] == "input"
    assert layers[1]["inputs"] == layers[0]["layer"]  # each layer names what it reads
    for row in layers:
        assert -1 <= row["cosine"] <= 1 and row["alone_sqnr_db"] is not None and row["max_diff_steps"] >= 0
    assert [row["stage"] for row in cls_debug["stages"]] == ALL_STAGES
    assert all(row["capture_exact"] is True and row["layers_read"] == "28 of 28" for row in cls_debug["stages"])
    rules = {row["layer"]: row for row in cls_debug["quantization"]}
    assert rules["classifier"]["output"] == "int32" and rules["features.0.0"]["grid"] == "[0, 255]"
    assert rules["features.0.0"]["rule"] == 'march "nash_e" default: uint8 (non-negative output)'
    assert rules["features.0.0"]["where"].endswith("tiny.toml:30")  # the line of `march = "nash_e"`
    assert cls_run.read_text().splitlines()[29] == 'march = "nash_e"'
    assert {row["layer"] for row in cls_debug["ranges"]} == set(rules) - {"classifier"}  # its output is not quantized
    assert all(row["dead_channels"] == 0 for row in cls_debug["weights"])
    assert cls_debug["advice"] and all({"layer", "do", "how"} <= set(a) for a in cls_debug["advice"])


def test_on_a_qat_run_the_default_pair_traces_quantization_alone(cls_debug):
    # QAT moved the weights: against the QAT model's own weights computed in float, no layer's
    # difference is its weights, only their quantization
    assert cls_debug["summary"]["pair"] == "qat_float vs int_infer"
    assert not any("weights differ" in row["diagnosis"] for row in cls_debug["causes"])
    assert sum(row["own_error_pct"] is not None for row in cls_debug["layers"]) >= 27  # own share vs chain known
    stages = {row["stage"]: row for row in cls_debug["stages"]}
    assert stages["qat_float"]["output_sqnr_db"] is not None  # not float's outputs: QAT trained the weights


def test_the_verdict_names_the_layer_that_loses_the_most_and_what_to_do(cls_debug):
    verdict, causes = cls_debug["verdict"], cls_debug["causes"]
    divergence = cls_debug["first_divergence"]
    expected = divergence["layer"] if divergence["layer"] and not divergence["inherited"] else causes[0]["layer"]
    assert verdict["layer"] == expected and verdict["finding"].startswith(f"{expected} (")
    assert f"{causes[0]['alone_output_sqnr_db']} dB SQNR" in verdict["finding"] or verdict["layer"] != causes[0]["layer"]
    assert "int_infer against qat_float on 64 images" in verdict["agreement"]
    assert (verdict["do"], verdict["how"]) in [(a["do"], a["how"]) for a in cls_debug["advice"]]


def test_causes_with_a_diagnosed_problem_rank_before_plain_rounding_error():
    from hatcli.workflows.debug_findings import rank_causes

    rows = [{"layer": name, "op": "conv2d", "dtype": "uint8", "alone_sqnr_db": layer_db, "alone_output_sqnr_db": out_db,
             "added_db": 0.0} for name, layer_db, out_db in [("a", 30.0, 20.0), ("b", 12.0, 35.0), ("c", 40.0, 25.0)]]
    plain = rank_causes(rows, {}, [])
    assert [c["layer"] for c in plain] == ["a", "c", "b"]  # by what each costs the outputs
    moved = rank_causes(rows, {"c": ["its weights differ from the float model's (3 % of their norm)"]}, [])
    assert [c["layer"] for c in moved] == ["a", "c", "b"]  # weights QAT moved are not a quantization problem
    clipped = rank_causes(rows, {"b": ["scale does not cover the data range: 9 % ..."]}, [])
    assert [c["layer"] for c in clipped] == ["b", "a", "c"]


def test_the_worst_inputs_are_drawn_with_every_stage_s_prediction(cls_debug, cls_run):
    from PIL import Image

    worst = cls_debug["worst_inputs"]
    assert [row["rank"] for row in worst] == [1, 2, 3, 4]
    keys = [(not row["same_prediction"], row["difference_rms"]) for row in worst]
    assert keys == sorted(keys, reverse=True)  # differing predictions first, then the largest difference
    folder = cls_run.parent / "runs" / "tiny" / "debug"
    for row in worst:
        assert row["file"].endswith(".jpg") and row["truth"]
        assert all(row[stage] for stage in ALL_STAGES)  # each stage's top class and score
        with Image.open(folder / row["image"]) as picture:
            assert picture.width > 5 * picture.height  # six pictures side by side


def test_hat_report_shows_the_findings_and_the_drawings(hat, cls_debug, cls_run, tmp_path):
    out = tmp_path / "report.html"
    result = hat("report", cls_run, "--images", "0", "--out", out, "--json")
    assert result.code == 0, result.err
    assert "debug" in result.json()["present"]
    page = out.read_text()
    debug = page[page.index('<h2 id="debug">'):page.index('<h2 id="recipe">')]
    for key in SECTIONS:
        assert f'data-debug="{key}"' in debug
    # the answer first: the verdict, the per-layer chart, then the causes and the advice open
    assert debug.index('data-debug="verdict"') < debug.index('data-chart="debug layers') < debug.index(
        '<section data-debug="causes">') < debug.index('<section data-debug="advice">')
    assert '<details data-debug="layers">' in debug  # the detail folded
    assert page.index('data-debug="headline"') < page.index('<h2 id="stages">')  # the answer on top of the page
    assert cls_debug["verdict"]["how"] in html.unescape(debug)
    assert debug.count('<figure class="wide"><img src="data:image/jpeg;base64,') == 4
    assert html.escape(cls_debug["worst_inputs"][0]["file"]) in debug
    from test_report import _browser

    browser = _browser()
    try:
        browser.get(out.resolve().as_uri())
        chart = browser.execute_script(
            "const s = document.querySelector('svg[data-chart^=\"debug layers\"]'); const r = s.getBoundingClientRect();"
            " return [r.width, r.height, s.querySelectorAll('circle').length]")
        verdict = browser.execute_script("return document.querySelector('.verdict').innerText")
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        log = browser.get_log("browser")
    finally:
        browser.quit()
    assert chart[0] > 400 and chart[1] > 100 and chart[2] >= 28, chart  # a point per layer at least
    assert cls_debug["verdict"]["layer"] in verdict and "What to do" in verdict
    assert overflow <= 0  # wide tables scroll inside their box; the page does not
    assert [entry for entry in log if entry["level"] == "SEVERE"] == [], log


def test_the_terminal_names_the_first_divergence_the_causes_and_the_advice(hat, cls_run):
    result = hat("debug", cls_run, "--stages", "float,calibration", "--pair", "float,calibration", "--images", "8",
                 "--worst", "0", "--sqnr", "200")
    assert result.code == 0, result.err
    assert "float vs calibration on 8 images, 28 layers (cosine 0.99, SQNR 200 dB)" in result.out
    assert "first divergence: features.0.0 (conv2d+relu, uint8)" in result.out  # every layer is below 200 dB
    assert "layers whose own error is largest" in result.out and "advice: " in result.out
    data = json.loads((cls_run.parent / "runs" / "tiny" / "debug" / "debug.json").read_text())
    assert data["worst_inputs"] == [] and data["summary"]["stages"] == "float, calibration"


# -- clear errors -------------------------------------------------------------------------------


def test_a_stage_not_made_yet_is_exit_2_naming_the_command_that_makes_it(hat, cls_run, tmp_path):
    recipe = faults.copy_run(cls_run, tmp_path)
    run = tmp_path / "runs" / "tiny"
    for stage in ("calibration", "qat", "int_infer", "export", "compile"):
        faults.shutil.rmtree(run / stage)
    missing = hat("debug", recipe)
    assert missing.code == 2
    assert "stage `int_infer` has not been made yet" in missing.err
    assert f"run `hat train {recipe} --stage calibration` first" in missing.err  # QAT needs a calibration first
    deploy = hat("debug", recipe, "--stages", "float", "--pair", "float,deploy")
    assert deploy.code == 2 and "stage `deploy` has not been made yet" in deploy.err
    assert f"run `hat run {recipe}` first" in deploy.err
    assert hat("debug", recipe, "--pair", "float").code == 2
    unknown = hat("debug", recipe, "--stages", "floaty")
    assert unknown.code == 2 and "unknown stage `floaty`" in unknown.err


# -- planted faults -----------------------------------------------------------------------------

DEBUG_BEFORE = ["--stages", "float,calibration,int_infer", "--worst", "0"]
"""Faults planted in the calibration (QAT off): float against the integer program."""
DEBUG_DEPLOY = ["--stages", "float,int_infer,deploy", "--pair", "int_infer,deploy", "--worst", "0"]
"""A fault in the compiled artifact: the integer program against it."""
FOUR_BITS = '\n[[quant.layers]]\npattern = "{layer}"\nscheme = "lsq"\nweight_bits = 4\nactivation_bits = 4\n'


def _plant(kind: str, source: Path, folder: Path, layer: str) -> tuple[Path, str, list[str]]:
    """Plant one fault of `kind` in a copy of `source`'s run; (recipe, planted layer, debug options)."""
    if kind == "range cut to a tenth":
        recipe = faults.copy_run(source, folder, faults.QAT_OFF)
        faults.cut_range(recipe, "calibration", layer)
    elif kind == "dead channel":
        recipe = faults.copy_run(source, folder, faults.QAT_OFF)
        faults.kill_channel(recipe, "calibration", layer)
    elif kind == "4 bits":
        recipe = faults.copy_run(source, folder, faults.QAT_OFF, append=FOUR_BITS.format(layer=layer))
        faults.calibrate(recipe)
    elif kind == "int16 made int8":
        recipe = faults.copy_run(source, folder, faults.QAT_OFF)
        layer = faults.outlier_channel(recipe, int(layer))  # needs int16 now; the recipe keeps it int8
        faults.calibrate(recipe)
    else:  # left float by the compiler
        recipe = faults.copy_run(source, folder)
        faults.leave_float(recipe, layer)
        return recipe, layer, DEBUG_DEPLOY
    return recipe, layer, DEBUG_BEFORE


PLANTINGS = [
    ("cls_run", "range cut to a tenth", "features.2.1.0"),
    ("cls_run", "range cut to a tenth", "features.9.1.0"),
    ("cls_run", "dead channel", "features.5.1.0"),
    ("cls_run", "4 bits", "features.7.1.0"),
    ("cls_run", "int16 made int8", "3"),
    ("cls_run", "left float", "features.6.1.0"),
    ("det_run", "range cut to a tenth", "backbone.stages.2.0.block.1.0"),
    ("det_run", "dead channel", "neck.layers.0.top_down.1.1.0"),
    ("det_run", "4 bits", "backbone.stages.4.0.block.1.0"),
    ("det_run", "left float", "backbone.stages.1.0.block.0.0"),
]


@pytest.mark.slow  # ten debug runs (~90 s on 2 cores): `pytest -m slow` runs it
def test_a_planted_fault_is_named_as_the_first_divergence_or_the_top_cause(hat, request, tmp_path):
    outcomes, named = [], 0
    for number, (run, kind, layer) in enumerate(PLANTINGS):
        recipe, planted, options = _plant(kind, request.getfixturevalue(run), tmp_path / str(number), layer)
        data = _debug(hat, recipe, *options, *(["--images", "8"] if run == "det_run" else []))
        first, top = data["first_divergence"].get("layer"), data["causes"][0]["layer"]
        hit = planted in (first, top)
        named += hit
        outcomes.append(f"{'named ' if hit else 'MISSED'} {run} {kind} at {planted}: first divergence {first}, "
                        f"top cause {top} ({data['causes'][0]['diagnosis']})")
    print("\n".join(outcomes))
    assert named >= 9, "\n".join(outcomes)


def test_the_same_outlier_in_an_int16_layer_is_not_blamed(hat, cls_run, tmp_path):
    recipe = faults.copy_run(cls_run, tmp_path, faults.QAT_OFF,
                             ('march = "nash_e"', 'march = "nash_e"\nint16 = ["features.3.1.2"]'))
    layer = faults.outlier_channel(recipe, 3)
    faults.calibrate(recipe)
    data = _debug(hat, recipe, *DEBUG_BEFORE)
    assert data["first_divergence"]["layer"] is None
    assert layer not in [cause["layer"] for cause in data["causes"][:2]]
    rule = next(row for row in data["quantization"] if row["layer"] == layer)
    assert rule["output"] == "int16" and rule["rule"] == 'quant.int16 pattern "features.3.1.2"'
    line = recipe.read_text().splitlines().index('int16 = ["features.3.1.2"]') + 1
    assert rule["where"] == f"{recipe}:{line}"  # the recipe line that asks for it
