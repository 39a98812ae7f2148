"""Semantic segmentation in the core: the packed mask records, mask-aware transforms, the
confusion-matrix scores, label maps mapped back onto the original image, and the drawing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from hatcli.data.datasets import open_dataset, segmentation_collate, transform_segmentation
from hatcli.data.masks import encode_mask, read_mask
from hatcli.data.packers.mask_folders import pack_mask_folders
from hatcli.data.palette import voc_colormap
from hatcli.data.transforms import build_transforms
from hatcli.metrics.segmentation import ConfusionMatrix
from hatcli.tasks.segmentation import SegmentationMap, logits_at, to_original


def test_the_confusion_matrix_scores_iou_over_the_whole_set_and_leaves_out_ignored_pixels():
    matrix = ConfusionMatrix(num_classes=3, ignore_index=255)
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    matrix.update(predicted, truth)
    # class 0: TP 1, FP 1 (a 2 called 0), FN 1 (a 0 called 1) -> 1/3; class 1: TP 2, FP 1 -> 2/3;
    # class 2: TP 1, FN 1 -> 1/2. The two ignored pixels count nowhere.
    iou = matrix.class_iou()
    assert iou == pytest.approx([100 / 3, 200 / 3, 50.0])
    scores = matrix.compute()
    assert scores["mIoU"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    assert scores["pixel_acc"] == pytest.approx(100 * 4 / 6)


def test_a_class_absent_from_truth_and_prediction_has_no_iou_and_is_left_out_of_the_mean():
    matrix = ConfusionMatrix(num_classes=4)
    matrix.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]))
    assert matrix.class_iou() == [100.0, 100.0, None, None]
    assert matrix.compute()["mIoU"] == 100.0


def test_masks_round_trip_through_the_packed_png_and_palette_masks_keep_their_indices():
    labels = np.array([[0, 1, 2], [20, 255, 3]], dtype=np.uint8)
    values, problem = read_mask(encode_mask(labels))
    assert problem is None and (values == labels).all()
    palette = Image.fromarray(labels, "P")
    palette.putpalette([c for rgb in voc_colormap(256) for c in rgb])
    import io

    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    values, problem = read_mask(buf.getvalue())
    assert problem is None and (values == labels).all()  # indices, not the palette's colours
    rgb = io.BytesIO()
    Image.new("RGB", (3, 2)).save(rgb, format="PNG")
    values, problem = read_mask(rgb.getvalue())
    assert values is None and "RGB" in problem


def test_geometric_transforms_move_the_mask_with_the_image_and_pad_it_with_the_ignore_index():
    image = torch.zeros(3, 4, 6, dtype=torch.uint8)
    image[:, :, :3] = 200  # left half bright
    mask = torch.zeros(4, 6, dtype=torch.uint8)
    mask[:, :3] = 1
    target = {"mask": tv_tensors.Mask(mask), "image_box": torch.tensor([0.0, 0.0, 6.0, 4.0])}
    pipeline = build_transforms([{"name": "RandomFlip", "px": 1.0}, {"name": "Resize", "size": [8, 12]},
                                 {"name": "Pad", "size": [10, 12]}], "t")
    out_image, out = transform_segmentation(pipeline, image, target)
    moved = out["mask"].as_subclass(torch.Tensor)
    assert moved.shape == (10, 12) and moved.dtype == torch.uint8
    assert set(moved[:8].unique().tolist()) == {0, 1}  # nearest: still class indices only
    assert (moved[:8, 6:] == 1).all() and (moved[:8, :6] == 0).all()  # flipped: the class is on the right
    assert (moved[8:] == 255).all()  # padding belongs to no class
    assert (out_image[0, :8, 7:] == 200).all() and (out_image[0, :8, :5] == 0).all()  # bilinear edge between
    assert out["image_box"].tolist() == [12.0, 0.0, 0.0, 8.0]


def test_a_label_map_maps_back_onto_the_original_image_through_resize_pad_and_flip():
    original = torch.zeros(4, 6, dtype=torch.int64)
    original[:, :2] = 3
    image = torch.zeros(3, 4, 6, dtype=torch.uint8)
    target = {"mask": tv_tensors.Mask(original.to(torch.uint8)), "image_box": torch.tensor([0.0, 0.0, 6.0, 4.0]),
              "orig_size": (4, 6)}
    pipeline = build_transforms([{"name": "RandomFlip", "px": 1.0}, {"name": "Resize", "size": [8, 12]},
                                 {"name": "Pad", "size_divisor": 16}], "t")
    _, moved = transform_segmentation(pipeline, image, target)
    seen = moved["mask"].as_subclass(torch.Tensor).to(torch.int64)
    seen[seen == 255] = 0
    back = to_original(SegmentationMap(seen, torch.ones(seen.shape)), moved)
    assert back.labels.shape == (4, 6)
    assert torch.equal(back.labels, original)


def test_logits_are_upsampled_bilinearly_only_when_their_size_differs():
    logits = torch.randn(2, 3, 4, 4)
    assert logits_at(logits, (4, 4)) is logits
    assert logits_at((logits,), (8, 8)).shape == (2, 3, 8, 8)


def test_the_shapes_generator_packs_segmentation_masks_of_the_shapes_it_draws(tmp_path):
    from hatcli.data.shapes import SEGMENTATION_CLASSES, render_image

    _, objects, mask = render_image(0, "train", 3, 64, "segmentation")
    assert mask.shape == (64, 64) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) <= {0, *(o["label"] + 1 for o in objects)}
    for obj in objects:  # every shape covers pixels of its class inside its box
        x, y, w, h = obj["box"]
        inside = mask[int(y):int(y + h) + 1, int(x):int(x + w) + 1]
        assert (inside == obj["label"] + 1).any()
    from hatcli.data.shapes import pack_shapes
    from hatcli.family import PackRequest

    pack_shapes(PackRequest(kind="shapes", target_data_dir=tmp_path, task="segmentation", num_images=10))
    dataset = open_dataset(tmp_path / "val_lmdb")
    assert dataset.kind == "segmentation" and dataset.classes == list(SEGMENTATION_CLASSES)
    assert dataset.meta["ignore_index"] == 255 and len(dataset.meta["palette"]) == len(SEGMENTATION_CLASSES)
    image, target = dataset[0]
    assert image.shape == (3, 64, 64) and target["mask"].shape == (64, 64)
    images, targets = segmentation_collate([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 64, 64) and targets[1]["img_size"] == (64, 64)


def _tree(root, size=(8, 6), mask_size=None, mask_values=(0, 1)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.new("RGB", size, (90, 20, 20)).save(root / "images" / "a.jpg")
    labels = np.zeros((mask_size or size)[::-1], dtype=np.uint8)
    labels[0, 0] = mask_values[1]
    Image.fromarray(labels, "L").save(root / "masks" / "a.png")
    Image.new("RGB", size).save(root / "images" / "b.jpg")  # no mask
    return root


@pytest.mark.parametrize("problem, expected", [
    ({"mask_size": (5, 6)}, "the mask is 5x6 (WxH) but the image is 8x6"),
    ({"mask_values": (0, 9)}, "holds value 9"),
])
def test_mask_folder_packing_rejects_bad_masks_and_images_without_one(tmp_path, problem, expected):
    import json

    src = _tree(tmp_path / "src", **problem)
    summary = pack_mask_folders(src / "images", src / "masks", tmp_path / "out", "val", ["bg", "fg"],
                                palette=voc_colormap(2), source="test")
    assert summary.count == 0 and summary.rejected == 2
    reasons = [json.loads(line)["reason"] for line in summary.rejected_file.read_text().splitlines()]
    assert any(expected in r for r in reasons), reasons
    assert any("no mask" in r for r in reasons), reasons


def test_the_drawing_tints_each_class_but_the_black_background_and_adds_a_legend():
    from hatcli.tasks.segmentation import SegmentationFamily

    image = Image.new("RGB", (400, 200), (200, 200, 200))
    labels = torch.zeros(200, 400, dtype=torch.int64)
    labels[:, 300:] = 1  # the right quarter is class 1 (dark red in VOC's map)
    drawn = SegmentationFamily.draw_predictions(None, image, SegmentationMap(labels, torch.ones(200, 400)),
                                                ["background", "thing"])
    assert drawn.size == (400, 200)
    assert drawn.getpixel((200, 150)) == (200, 200, 200)  # background: untouched
    r, g, b = drawn.getpixel((350, 150))
    assert r > g and r > b  # tinted towards the class colour
    assert drawn.getpixel((10, 8)) != (200, 200, 200)  # the legend's panel in the top-left corner
