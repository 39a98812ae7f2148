"""One real run of the whole chain for a detector on tiny data: FCOS-EfficientNet on shapes."""

from __future__ import annotations

from pathlib import Path

import pytest

DETECTION_RECIPE = """
task = "tiny_det"
work_dir = "{work}"
seed = 0

[data]
root = "{data}"
input_size = [128, 128]
batch_size = 8
val_transforms = [{{ name = "Resize", size = [128, 128], keep_ratio = true }}, {{ name = "Pad", size = [128, 128] }}]
train_transforms = [{{ name = "Resize", size = [128, 128] }}, {{ name = "RandomFlip", px = 0.5 }}]

[data.pack]
kind = "shapes"
task = "detection"
num_images = 60
image_size = 96
seed = 1

[model]
name = "fcos_efficientnet_b0"
width_mult = 0.25
depth_mult = 0.34
channels = 16
neck_layers = 1
head_convs = 1

[float]
epochs = 1
[float.optimizer]
name = "adamw"
lr = 0.002

[calibration]
num_batches = 2

[qat]
epochs = 1

[quant]
march = "nash_e"

[deploy]
perf_runs = 3
"""


@pytest.fixture
def det_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "det.toml"
    path.write_text(DETECTION_RECIPE.format(work=tmp_path / "runs", data=tmp_path / "data"))
    return path


@pytest.mark.slow
def test_a_detector_goes_through_every_stage_and_deploys_what_int_infer_computes(hat, det_recipe, tmp_path):
    result = hat("run", det_recipe, "--json")
    assert result.code == 0, result.err
    rows = {row["stage"]: row for row in result.json()}
    assert list(rows) == ["pack", "float", "calibration", "qat", "int_infer", "export", "check (nash_e)",
                          "compile (nash_e -O3)", "perf", "deploy"]
    assert rows["check (nash_e)"]["values"]["supported"] is True
    for stage in ("float", "calibration", "qat", "int_infer", "deploy"):
        metrics = rows[stage]["values"]
        assert set(metrics) == {"mAP", "AP50", "AP75", "APs", "APm", "APl"}
        assert 0 <= metrics["mAP"] <= 100
    # the compiled artifact on ONNX Runtime computes the integer program's outputs
    assert rows["deploy"]["values"] == rows["int_infer"]["values"]

    compared = hat("eval", det_recipe, "--stage", "deploy", "--compare", "int_infer,qat", "--json")
    assert compared.code == 0, compared.err
    pairs = {(p["a"], p["b"]): p for p in compared.json()["agreement"]}
    exact = pairs[("deploy", "int_infer")]
    assert exact["images"] == 12 and exact["same_detections"] == 100.0 and exact["max_diff_steps"] == 0.0
    assert 0 <= pairs[("int_infer", "qat")]["same_detections"] <= 100

    # infer draws boxes on a raw image, in that image's own pixels
    picture = tmp_path / "boxes.png"
    image = next((tmp_path / "data" / "raw" / "val2017").glob("*.jpg"))
    out = hat("infer", det_recipe, "--input", image, "--out", picture, "--min-score", "0.0", "--topk", "5", "--json")
    assert out.code == 0, out.err
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = out.json()["predictions"]
    assert len(found) <= 5 and all(0 <= v <= 96 for p in found for v in p["box"])
    assert all(p["label"] in ("circle", "cross", "ring", "square", "star", "triangle") for p in found)

    # the integer program counts the same MACs as the float network
    ops = hat("calops", det_recipe, "--json")
    int_ops = hat("calops", det_recipe, "--stage", "int_infer", "--json")
    assert ops.code == 0 and int_ops.code == 0, int_ops.err
    assert ops.json()["macs"] == int_ops.json()["macs"] > 0


def test_fcos_trains_on_a_packed_pascal_voc_tree_unchanged_and_scores_voc_map(hat, tmp_path):
    from test_pack_voc import voc_tree

    src = voc_tree(tmp_path / "src")
    packed = hat("pack", "voc", "--src-data-dir", src, "--target-data-dir", tmp_path / "voc", "--split", "all")
    assert packed.code == 0, packed.err
    recipe = tmp_path / "voc.toml"
    text = DETECTION_RECIPE.format(work=tmp_path / "runs", data=tmp_path / "voc")
    recipe.write_text(text.replace("[data.pack]", "[unused]").replace('kind = "shapes"\ntask = "detection"\n', "")
                      .replace("num_images = 60\nimage_size = 96\nseed = 1\n", "").replace("[unused]\n", "")
                      .replace("batch_size = 8", "batch_size = 2"))
    trained = hat("train", recipe, "--stage", "float", "--json")
    assert trained.code == 0, trained.err
    metrics = trained.json()["metrics"]
    # the VOC devkit's AP50 beside COCO's figures, both scored on the VOC val split
    assert {"mAP", "AP50", "voc_mAP50"} <= set(metrics) and 0 <= metrics["voc_mAP50"] <= 100
