"""One real run of the whole chain for semantic segmentation on tiny data: UNet on shapes masks."""

from __future__ import annotations

from pathlib import Path

import pytest

SEGMENTATION_RECIPE = """
task = "tiny_seg"
work_dir = "{work}"
seed = 0

[data]
root = "{data}"
input_size = [32, 32]
batch_size = 8
train_transforms = [{{ name = "Resize", size = [32, 32], ratio_range = [0.8, 1.25] }},
                    {{ name = "RandomCrop", size = [32, 32] }}, {{ name = "RandomFlip", px = 0.5 }}]
val_transforms = [{{ name = "Resize", size = [32, 32] }}]

[data.pack]
kind = "shapes"
task = "segmentation"
num_images = 40
image_size = 48
seed = 1

[model]
name = "unet"
base_channels = 8
depth = 2
dilation = 2
upsample = "{upsample}"

[float]
epochs = 1
[float.optimizer]
name = "adamw"
lr = 0.003

[calibration]
num_batches = 2

[qat]
epochs = 1

[quant]
march = "nash_e"

[deploy]
perf_runs = 3
"""


@pytest.fixture(params=["bilinear"])
def seg_recipe(tmp_path: Path, request) -> Path:
    path = tmp_path / "seg.toml"
    path.write_text(SEGMENTATION_RECIPE.format(work=tmp_path / "runs", data=tmp_path / "data", upsample=request.param))
    return path


def test_a_segmenter_goes_through_every_stage_and_deploys_what_int_infer_computes(hat, seg_recipe, tmp_path):
    result = hat("run", seg_recipe, "--json")
    assert result.code == 0, result.err
    rows = {row["stage"]: row for row in result.json()}
    assert list(rows) == ["pack", "float", "calibration", "qat", "int_infer", "export", "check (nash_e)",
                          "compile (nash_e -O3)", "perf", "deploy"]
    assert rows["check (nash_e)"]["values"]["supported"] is True
    for stage in ("float", "calibration", "qat", "int_infer", "deploy"):
        assert set(rows[stage]["values"]) == {"mIoU", "pixel_acc", "mean_acc"}
    assert rows["deploy"]["values"] == rows["int_infer"]["values"]

    # pixel by pixel, the compiled artifact on ONNX Runtime computes the integer program's classes
    compared = hat("eval", seg_recipe, "--stage", "deploy", "--compare", "int_infer,qat", "--json")
    assert compared.code == 0, compared.err
    pairs = {(p["a"], p["b"]): p for p in compared.json()["agreement"]}
    exact = pairs[("deploy", "int_infer")]
    assert exact["images"] == 8 and exact["pixel_agreement"] == 100.0 and exact["mIoU_diff"] == 0.0
    assert exact["max_diff_steps"] == 0.0
    assert 0 <= pairs[("int_infer", "qat")]["pixel_agreement"] <= 100

    # eval lists every class's IoU
    scored = hat("eval", seg_recipe, "--stage", "int_infer", "--json")
    per_class = scored.json()["per_class"]
    assert per_class["metric"] == "IoU" and list(per_class["values"])[0] == "background"

    # infer draws a coloured mask with a legend on a raw image, in that image's own pixels
    from PIL import Image

    picture = tmp_path / "mask.png"
    image = next((tmp_path / "data" / "raw" / "segmentation" / "val" / "images").glob("*.jpg"))
    out = hat("infer", seg_recipe, "--input", image, "--out", picture, "--json")
    assert out.code == 0, out.err
    found = out.json()["predictions"]
    assert found and abs(sum(p["share"] for p in found) - 1.0) < 1e-6
    assert all(p["label"] in ("background", "circle", "cross", "ring", "square", "star", "triangle") for p in found)
    drawn = Image.open(picture)
    assert drawn.width >= 320 and drawn.mode == "RGB"
