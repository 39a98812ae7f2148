"""What the core does for every detection family: boxes back onto the original image, COCO mAP
from raw outputs, and whether two stages' detections are the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hatcli.data.datasets import DetectionDataset
from hatcli.data.shapes import pack_shapes
from hatcli.data.transforms import build_transforms
from hatcli.workflows.compare import same_detections
from hatcli.family import PackRequest
from hatcli.tasks.detection import DetectionFamily, DetectionMetric, Detections, to_original

SIZE = 48

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


@pytest.fixture(scope="module")
def det_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("det_core")
    pack_shapes(PackRequest(kind="shapes", target_data_dir=root, task="detection", num_images=20,
                            image_size=SIZE, seed=5))
    return root


PIPELINES = {
    "resize keep_ratio + pad": [{"name": "Resize", "size": [80, 128], "keep_ratio": True},
                                {"name": "Pad", "size_divisor": 32}],
    "stretch": [{"name": "Resize", "size": [64, 96]}],
    "flip + resize": [{"name": "RandomFlip", "px": 1.0, "py": 1.0}, {"name": "Resize", "size": [64, 64]}],
}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_boxes_in_model_input_pixels_map_back_onto_the_original_image(det_root: Path, name: str) -> None:
    plain = DetectionDataset(det_root / "val_lmdb")
    moved = DetectionDataset(det_root / "val_lmdb", build_transforms(PIPELINES[name], "data.val_transforms"))
    for index in range(len(plain)):
        original = plain[index][1]
        image, target = moved[index]
        assert target["orig_size"] == (SIZE, SIZE)
        as_detections = Detections(target["boxes"], torch.ones(len(target["labels"])), target["labels"])
        back = to_original(as_detections, target)
        assert torch.allclose(back.boxes, original["boxes"], atol=1e-3), index
        assert torch.equal(back.labels, original["labels"])


def test_boxes_are_clipped_to_the_original_image() -> None:
    target = {"orig_size": (10, 20), "image_box": torch.tensor([0.0, 0.0, 40.0, 20.0])}
    found = Detections(torch.tensor([[-8.0, -2.0, 44.0, 10.0]]), torch.tensor([0.9]), torch.tensor([1]))
    assert to_original(found, target).boxes.tolist() == [[0.0, 0.0, 20.0, 5.0]]


class _Oracle(DetectionFamily):
    """A detection 'family' whose raw outputs are the detections themselves: scores the metric."""

    name = "oracle_det"

    def build_float_model(self, config, num_classes):
        raise NotImplementedError

    def loss(self, outputs, targets, label_smoothing=0.0, config=None):
        raise NotImplementedError

    def predict(self, outputs, topk=100, config=None):
        return outputs


def test_detection_metric_scores_the_family_decoded_boxes_on_original_pixels(det_root: Path) -> None:
    dataset = DetectionDataset(det_root / "val_lmdb", build_transforms(PIPELINES["resize keep_ratio + pad"],
                                                                       "data.val_transforms"))
    perfect = DetectionMetric(_Oracle(), dataset)
    shifted = DetectionMetric(_Oracle(), dataset)
    for index in range(len(dataset)):
        _, target = dataset[index]
        boxes = target["boxes"]
        perfect.update([Detections(boxes, torch.ones(len(boxes)), target["labels"])], [target])
        # the left half of every box overlaps its object at IoU 0.5
        half = boxes.clone()
        half[:, 2] = (boxes[:, 0] + boxes[:, 2]) / 2
        shifted.update([Detections(half, torch.ones(len(boxes)), target["labels"])], [target])
    assert perfect.compute()["mAP"] == pytest.approx(100.0)
    result = shifted.compute()
    assert result["mAP"] <= 10.0 and result["AP75"] == pytest.approx(0.0)


def _det(boxes, labels, scores=None) -> Detections:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scores = torch.tensor(scores if scores is not None else [0.5] * len(boxes))
    return Detections(boxes, scores, torch.tensor(labels, dtype=torch.int64))


def test_same_detections_needs_equal_counts_classes_and_overlapping_boxes() -> None:
    a = _det([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1], [0.9, 0.8])
    assert same_detections(a, _det([[20, 20, 30, 30], [0, 0, 10, 10]], [1, 0]))  # order does not matter
    assert same_detections(a, _det([[0, 0, 10, 10.1], [20, 20, 30, 30]], [0, 1]))  # IoU 0.99
    assert not same_detections(a, _det([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0]))  # a class differs
    assert not same_detections(a, _det([[0, 0, 10, 12], [20, 20, 30, 30]], [0, 1]))  # IoU 0.83
    assert not same_detections(a, _det([[0, 0, 10, 10]], [0]))  # one box fewer
    assert same_detections(_det([], []), _det([], []))
