"""Export and compile a real (tiny) recipe: the PTQ path, failures that leave nothing, argument
checks first, and a manifest that tells a consumer without hat how to feed the model.

One module-wide tiny recipe trains float (1 epoch) and calibration once; QAT is never trained,
so the recipe (QAT enabled) has calibration done and no QAT, as a user who skipped it would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hatcli.recipe import load_recipe
from conftest import TINY_RECIPE

PTQ = ("--set", "qat.enabled=false")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, tiny_shapes: Path) -> Path:
    """A tiny recipe whose float and calibration stages are done (QAT is enabled but not run)."""
    from hatcli.workflows.training import calibrate, train_float

    root = tmp_path_factory.mktemp("calibrated")
    recipe = root / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(work=root / "runs", data=tiny_shapes).replace("epochs = 2", "epochs = 1"))
    lr = load_recipe(recipe, [])
    train_float(lr)
    calibrate(lr)
    return recipe


@pytest.fixture(scope="module")
def ptq_run(calibrated: Path) -> dict:
    """`hat run` of the recipe with QAT disabled (float and calibration are reused)."""
    from hatcli.main import run_cli

    code = run_cli(["run", str(calibrated), *PTQ])
    assert code == 0
    runs = calibrated.parent / "runs" / "tiny"
    return {"summary": json.loads((runs / "summary.json").read_text()), "artifact": runs / "compile" / "nash_e-O3",
            "export": runs / "export"}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- item 19: the PTQ path, nothing left behind, arguments first ---------------------------------

def test_export_without_a_qat_checkpoint_says_how_to_export_the_calibration_model(hat, calibrated: Path) -> None:
    result = hat("export", calibrated, "--out", calibrated.parent / "qat-export")
    assert result.code == 1
    assert "no QAT checkpoint" in result.err and "--stage calibration" in result.err
    assert not (calibrated.parent / "qat-export").exists()
    assert not _leftovers(calibrated.parent)


def test_export_stage_calibration_exports_the_ptq_model(hat, calibrated: Path) -> None:
    out = calibrated.parent / "ptq-export"
    result = hat("export", calibrated, "--stage", "calibration", "--out", out, "--json")
    assert result.code == 0, result.err
    assert result.json()["stage"] == "calibration"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_stage"] == "calibration"
    assert {"model.pt2", "model.onnx", "manifest.json", "recipe.toml"} == {p.name for p in out.iterdir()}


def test_export_stage_must_be_calibration_or_qat(hat, calibrated: Path) -> None:
    bad = hat("export", calibrated, "--stage", "float", "--out", calibrated.parent / "never")
    assert bad.code == 2 and "--stage" in bad.err
    off = hat("export", calibrated, "--stage", "qat", *PTQ, "--out", calibrated.parent / "never")
    assert off.code == 2 and "qat.enabled = false" in off.err
    assert not (calibrated.parent / "never").exists()


def test_a_failing_export_keeps_the_previous_one_and_leaves_no_temp_folder(hat, calibrated: Path, monkeypatch) -> None:
    import hatcli.deploy.export as export
    from hatcli.errors import HatError

    out = calibrated.parent / "kept-export"
    assert hat("export", calibrated, "--stage", "calibration", "--out", out).code == 0
    before = (out / "manifest.json").read_bytes()

    def broken(*args, **kwargs):
        raise HatError("ONNX export failed: simulated")

    monkeypatch.setattr(export, "export_onnx", broken)
    assert hat("export", calibrated, "--stage", "calibration", "--out", out).code == 1
    assert (out / "manifest.json").read_bytes() == before
    fresh = calibrated.parent / "new" / "deeper" / "export"
    assert hat("export", calibrated, "--stage", "calibration", "--out", fresh).code == 1
    assert not (calibrated.parent / "new").exists() and not _leftovers(calibrated.parent)


@pytest.mark.parametrize("command", [
    ["check", "{recipe}", "--march", "nash_x"],
    ["compile", "{recipe}", "--march", "nash_x"],
    ["compile", "{recipe}", "--opt", "7"],
    ["perf", "{missing}", "--march", "nash_x"],
])
def test_bad_arguments_are_reported_before_a_missing_export(hat, calibrated: Path, command: list[str]) -> None:
    args = [a.format(recipe=calibrated, missing=calibrated.parent / "no-such-artifact") for a in command]
    result = hat(*args, "--set", "task=never_exported") if command[0] != "perf" else hat(*args)
    assert result.code == 2, result.err
    assert "nash_x" in result.err or "--opt" in result.err
    assert "no exported model" not in result.err


def test_hat_run_with_qat_disabled_exports_and_deploys_the_calibration_model(ptq_run: dict) -> None:
    stages = [row["stage"] for row in ptq_run["summary"]]
    assert "qat" not in stages and stages[-1] == "deploy"
    assert {r["stage"]: r["reused"] for r in ptq_run["summary"]}["calibration"] is True
    assert json.loads((ptq_run["export"] / "manifest.json").read_text())["source_stage"] == "calibration"
    assert json.loads((ptq_run["artifact"] / "manifest.json").read_text())["extra"]["source_stage"] == "calibration"


# -- item 15: everything a consumer needs is in the manifest -------------------------------------

def test_manifests_record_preprocessing_classes_and_outputs(ptq_run: dict) -> None:
    for folder in (ptq_run["export"], ptq_run["artifact"]):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["task"] == "tiny" and manifest["kind"] == "classification"
        assert manifest["classes"] == ["circle", "cross", "ring", "square", "star", "triangle"]
        pre = manifest["preprocess"]
        assert pre["resize"] == {"method": "stretch", "size": [32, 32], "interpolation": "bilinear",
                                 "antialias": True, "pad": None}
        assert pre["color_space"] == "RGB" and pre["normalize"] == {"mean": [128.0] * 3, "std": [128.0] * 3}
        assert pre["input"]["dtype"] == "float32" and pre["input"]["layout"] == "NCHW"
        assert pre["input"]["shape"] == ["N", 3, 32, 32] and pre["input"]["range"][0] == [-1.0, 127 / 128]
        assert [s["op"] for s in pre["steps"]] == ["resize", "to_float", "normalize"]
        (out,) = manifest["output_meaning"]
        assert out["name"] == "logits" and out["what"] == "logits" and out["shape"] == ["N", 6]


def _feed_like_a_consumer(artifact: Path, image: Path) -> tuple[list[str], np.ndarray]:
    """Only the manifest, PIL, numpy and onnxruntime: no hat code."""
    import onnxruntime as ort
    from PIL import Image

    manifest = json.loads((artifact / "manifest.json").read_text())
    pre = manifest["preprocess"]
    assert pre["resize"]["method"] == "stretch" and pre["resize"]["interpolation"] == "bilinear"
    h, w = pre["resize"]["size"]
    picture = Image.open(image).convert("RGB").resize((w, h), Image.BILINEAR)
    x = np.asarray(picture, dtype=np.float32).transpose(2, 0, 1)[None]
    mean = np.array(pre["normalize"]["mean"], np.float32)[:, None, None]
    std = np.array(pre["normalize"]["std"], np.float32)[:, None, None]
    session = ort.InferenceSession(str(artifact / manifest["model"]), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {manifest["inputs"][0]["name"]: (x - mean) / std})
    probs = np.exp(logits[0] - logits[0].max())
    return manifest["classes"], probs / probs.sum()


@pytest.mark.parametrize("size", [None, (50, 44)])
def test_feeding_the_artifact_from_the_manifest_alone_predicts_as_hat_infer(hat, calibrated: Path, ptq_run: dict,
                                                                             tiny_shapes: Path, tmp_path: Path,
                                                                             size: tuple[int, int] | None) -> None:
    from PIL import Image

    image = tmp_path / "input.png"
    sample = Image.open(sorted(tiny_shapes.glob("raw/val/*/*.jpg"))[0]).convert("RGB")
    (sample.resize(size, Image.BICUBIC) if size else sample).save(image)
    result = hat("infer", calibrated, *PTQ, "--stage", "deploy", "--input", image, "--out", tmp_path / "p.png",
                 "--topk", "6", "--json")
    assert result.code == 0, result.err
    rows = result.json()["predictions"]
    classes, probs = _feed_like_a_consumer(ptq_run["artifact"], image)
    assert classes[int(np.argmax(probs))] == rows[0]["label"]
    tolerance = 1e-5 if size is None else 0.02  # PIL and torchvision round 1% of resized pixels apart by 1
    for row in rows:
        assert probs[classes.index(row["label"])] == pytest.approx(row["score"], abs=tolerance)


def test_a_detection_recipe_records_keep_ratio_resize_bottom_right_pad_and_yuv() -> None:
    from hatcli.deploy.consumer import preprocess_spec

    pre = preprocess_spec(load_recipe(Path(__file__).parents[1] / "recipes" / "shapes_fcos.toml", []))
    assert pre["resize"] == {"method": "keep_ratio_pad", "size": [128, 128], "interpolation": "bilinear",
                             "antialias": True, "pad": {"value": 0.0, "where": "bottom_right"}}
    assert pre["color_space"] == "YUV444"
    assert [s["op"] for s in pre["steps"]] == ["resize", "pad", "rgb_to_yuv444", "to_float", "normalize"]
