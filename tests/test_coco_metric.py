"""COCO box mAP (hatcli/metrics/coco.py): how predictions are fed and what the numbers mean.

A detector's output per image is ``{"boxes": [N, 4] XYXY pixels of the original image,
"scores": [N], "labels": [N] contiguous 0..C-1}``; `CocoDetectionMetric` maps labels back to COCO
category ids, runs pycocotools' COCOeval and returns percentages. Feeding the ground truth back
as detections must score exactly 100: that is the sanity check used on synthetic shapes and on
the real COCO subset in ../shared/data/coco-tiny.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hatcli.data.datasets import DetectionDataset, coco_ground_truth
from hatcli.data.lmdb_format import open_packed
from hatcli.errors import DataError
from hatcli.metrics.coco import KEYS, CocoDetectionMetric

# torchvision 0.29 deprecates its image decoders in favour of torchcodec (not installed here).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

COCO_TINY = Path(__file__).parents[2] / "shared" / "data" / "coco-tiny"


# -- helpers ----------------------------------------------------------------------------------


def _ann(ann_id: int, image_id: int, category_id: int, bbox: list[float], iscrowd: int = 0) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": iscrowd}


def hand_made_ground_truth() -> dict[str, Any]:
    """3 images of 100x100, categories 3 and 7 (not contiguous), one crowd box, no large objects."""
    return {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 100, "width": 100} for i in (1, 2, 3)],
        "annotations": [
            _ann(1, 1, 3, [10, 10, 20, 20]),   # small: area 400 < 32**2
            _ann(2, 1, 7, [50, 40, 40, 30]),   # medium
            _ann(3, 2, 3, [5, 60, 35, 35]),
            _ann(4, 2, 7, [0, 0, 100, 40], iscrowd=1),  # a crowd region: never has to be found
            _ann(5, 2, 7, [60, 5, 30, 30]),
            _ann(6, 3, 7, [20, 20, 50, 50]),
            _ann(7, 3, 3, [75, 75, 12, 14]),
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }


CATEGORY_IDS = [3, 7]  # label 0 is category 3, label 1 is category 7


def ground_truth_as_predictions(gt: dict[str, Any], category_ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Every non-crowd ground-truth box as a detection of score 1.0, the way a model reports it."""
    label_of = {cid: label for label, cid in enumerate(category_ids)}
    per_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in gt["images"]}
    for ann in gt["annotations"]:
        if not ann["iscrowd"]:
            per_image[ann["image_id"]].append(ann)
    predictions = {}
    for image_id, anns in per_image.items():
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        predictions[image_id] = {
            "boxes": boxes,
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
        }
    return predictions


def score(gt: dict[str, Any], category_ids: list[int], predictions: dict[int, dict[str, Any]]) -> dict[str, float]:
    metric = CocoDetectionMetric(gt, category_ids)
    ids = list(predictions)
    for start in range(0, len(ids), 2):  # in batches of two images, as a loader would
        batch = ids[start:start + 2]
        metric.update(batch, [predictions[i] for i in batch])
    return metric.compute()


# -- a hand-made ground truth -----------------------------------------------------------------


def test_ground_truth_fed_back_scores_100() -> None:
    gt = hand_made_ground_truth()
    result = score(gt, CATEGORY_IDS, ground_truth_as_predictions(gt, CATEGORY_IDS))
    assert set(result) == set(KEYS)
    for key in ("mAP", "AP50", "AP75", "APs", "APm"):
        assert result[key] == pytest.approx(100.0), key
    assert math.isnan(result["APl"])  # no large objects in this ground truth: COCOeval's -1 is nan


def test_shifted_boxes_score_lower() -> None:
    gt = hand_made_ground_truth()
    predictions = ground_truth_as_predictions(gt, CATEGORY_IDS)

    def shifted(fraction: float) -> dict[int, dict[str, Any]]:
        out = copy.deepcopy(predictions)
        for p in out.values():
            p["boxes"][:, 0::2] += fraction * (p["boxes"][:, 2:3] - p["boxes"][:, 0:1])
        return out

    # Half a width off: IoU = 0.5 / 1.5 = 1/3, below every threshold of 0.50:0.95.
    assert score(gt, CATEGORY_IDS, shifted(0.5))["mAP"] == pytest.approx(0.0)
    # A quarter off: IoU = 0.75 / 1.25 = 0.6, a hit at IoU 0.5 but not at 0.75.
    quarter = score(gt, CATEGORY_IDS, shifted(0.25))
    assert quarter["AP50"] == pytest.approx(100.0)
    assert quarter["AP75"] == pytest.approx(0.0)
    assert 0.0 < quarter["mAP"] < 50.0


def test_an_image_without_predictions_counts_as_missed() -> None:
    """All ground-truth images are scored, not only those passed to `update`."""
    gt = hand_made_ground_truth()
    predictions = ground_truth_as_predictions(gt, CATEGORY_IDS)
    del predictions[2]
    result = score(gt, CATEGORY_IDS, predictions)
    assert 0.0 < result["mAP"] < 100.0


def test_swapped_labels_score_0() -> None:
    gt = hand_made_ground_truth()
    predictions = ground_truth_as_predictions(gt, CATEGORY_IDS)
    for p in predictions.values():
        p["labels"] = 1 - p["labels"]
    result = score(gt, CATEGORY_IDS, predictions)
    assert result["mAP"] == pytest.approx(0.0)
    assert result["AP50"] == pytest.approx(0.0)


def test_no_detections_score_0() -> None:
    result = CocoDetectionMetric(hand_made_ground_truth(), CATEGORY_IDS).compute()
    assert result["mAP"] == 0.0 and result["AP50"] == 0.0 and result["APs"] == 0.0
    assert math.isnan(result["APl"])  # still nothing to find there


def test_numpy_input_repeated_compute_and_untouched_ground_truth() -> None:
    gt = hand_made_ground_truth()
    before = copy.deepcopy(gt)
    metric = CocoDetectionMetric(gt, CATEGORY_IDS)
    for image_id, p in ground_truth_as_predictions(gt, CATEGORY_IDS).items():
        metric.update([image_id], [{k: v.numpy() for k, v in p.items()}])
    metric.update([1], [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}])
    first = metric.compute()
    assert first["mAP"] == pytest.approx(100.0)
    assert metric.compute()["mAP"] == pytest.approx(first["mAP"])
    assert gt == before  # COCOeval annotates its annotations in place: the metric works on a copy


# -- errors -----------------------------------------------------------------------------------


def _one_box(label: int) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "scores": torch.tensor([0.9]),
            "labels": torch.tensor([label])}


def test_unknown_image_id_is_a_data_error() -> None:
    metric = CocoDetectionMetric(hand_made_ground_truth(), CATEGORY_IDS)
    with pytest.raises(DataError, match="image id 42 is not in the ground truth"):
        metric.update([42], [_one_box(0)])


@pytest.mark.parametrize("label", [-1, 2])
def test_label_out_of_range_is_a_data_error(label: int) -> None:
    metric = CocoDetectionMetric(hand_made_ground_truth(), CATEGORY_IDS)
    with pytest.raises(DataError, match=rf"label {label}, outside 0\.\.1"):
        metric.update([1], [_one_box(label)])
    assert metric.results == []  # nothing of a failed batch is kept


def test_mismatched_shapes_and_unknown_categories_are_data_errors() -> None:
    metric = CocoDetectionMetric(hand_made_ground_truth(), CATEGORY_IDS)
    bad = _one_box(0)
    bad["scores"] = torch.tensor([0.9, 0.8])
    with pytest.raises(DataError, match="must be"):
        metric.update([1], [bad])
    with pytest.raises(DataError, match="image ids"):
        metric.update([1, 2], [_one_box(0)])
    with pytest.raises(DataError, match="category ids"):
        CocoDetectionMetric(hand_made_ground_truth(), [3, 8])


# -- round trips through the packed format ----------------------------------------------------


def assert_round_trip_scores_100(packed: Path) -> None:
    """Ground truth rebuilt from packed data, and the dataset's own targets, both score 100."""
    reader = open_packed(packed)
    category_ids = list(reader.meta["category_ids"])
    gt = coco_ground_truth(reader)
    assert gt["annotations"], "the packed data holds no boxes: nothing would be tested"

    assert score(gt, category_ids, ground_truth_as_predictions(gt, category_ids))["mAP"] == pytest.approx(100.0)

    dataset = DetectionDataset(packed)
    from_targets = {}
    for index in range(len(dataset)):
        _, target = dataset[index]
        from_targets[target["image_id"]] = {
            "boxes": target["boxes"], "scores": torch.ones(len(target["labels"])), "labels": target["labels"],
        }
    assert score(gt, category_ids, from_targets)["mAP"] == pytest.approx(100.0)


def test_round_trip_through_packed_shapes(tmp_path: Path) -> None:
    from hatcli.data.packers.coco import pack_coco_split
    from hatcli.data.shapes import generate_shapes

    generate_shapes(tmp_path, "detection", num_images=40, seed=0, image_size=64)
    raw = tmp_path / "raw"
    pack_coco_split(raw / "annotations" / "instances_val2017.json", raw / "val2017", tmp_path, "val")
    assert_round_trip_scores_100(tmp_path / "val_lmdb")


def test_round_trip_through_packed_coco_tiny(tmp_path: Path) -> None:
    """The real COCO subset (80 val images, 80 categories, crowd boxes, ids up to 90)."""
    ann_file = COCO_TINY / "annotations" / "instances_val2017.json"
    if not (ann_file.is_file() and (COCO_TINY / "val2017").is_dir()):
        pytest.skip(f"../shared/data/coco-tiny not present: the real-COCO round trip needs {ann_file} "
                    f"and {COCO_TINY / 'val2017'}")
    from hatcli.data.packers.coco import pack_coco_split

    pack_coco_split(ann_file, COCO_TINY / "val2017", tmp_path, "val")
    assert_round_trip_scores_100(tmp_path / "val_lmdb")
