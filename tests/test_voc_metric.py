"""The Pascal VOC detection metric (`hatcli.metrics.voc`) and its place in `DetectionMetric`.

What they pin: hand-computed APs (perfect detections, a false positive above a true one, a
detection on a difficult box that counts for nothing, the devkit's match-the-best-box-even-if-
taken rule, 11-point against all-point AP), classes without countable ground truth left out of the
mean, agreement with pycocotools' AP50 where the two rules coincide, and `DetectionMetric` adding
``voc_mAP50`` on VOC data only, with every rank's detections merged.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hatcli.data.datasets import DetectionDataset
from hatcli.data.lmdb_format import open_packed
from hatcli.data.packers.voc import pack_voc_split
from hatcli.metrics.coco import CocoDetectionMetric
from hatcli.metrics.voc import ImageTruth, VocDetectionMetric, average_precision
from hatcli.tasks.detection import DetectionMetric, Detections
from test_pack_voc import voc_tree
from test_packers import _coco_source, _pack_coco

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

A, B, FAR = [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [50.0, 50.0, 60.0, 60.0]


def _truth(boxes: list[list[float]], labels: list[int], ignore: list[bool] | None = None) -> ImageTruth:
    return ImageTruth(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
                      np.asarray(ignore or [False] * len(labels), dtype=bool))


def _detections(*scored: tuple[list[float], float], label: int = 0) -> dict[str, np.ndarray]:
    return {"boxes": np.asarray([box for box, _ in scored]).reshape(-1, 4),
            "scores": np.asarray([score for _, score in scored]), "labels": np.full(len(scored), label)}


def _score(truth: dict[int, ImageTruth], predictions: dict[int, dict], classes=("a", "b"), **kwargs) -> dict:
    metric = VocDetectionMetric(truth, classes, **kwargs)
    metric.update(list(predictions), list(predictions.values()))
    return metric.compute()


def test_perfect_detections_score_100_and_classes_without_truth_are_left_out() -> None:
    truth = {1: _truth([A, B], [0, 1]), 2: _truth([B], [0])}
    result = _score(truth, {1: {"boxes": np.asarray([A, B]), "scores": np.asarray([0.9, 0.8]), "labels": [0, 1]},
                            2: _detections((B, 0.7))}, classes=("a", "b", "c"))
    assert result["voc_mAP50"] == pytest.approx(100.0)
    assert result["voc_AP50_per_class"]["a"] == pytest.approx(100.0)
    assert math.isnan(result["voc_AP50_per_class"]["c"])  # no ground truth: nan, not in the mean


def test_a_false_positive_ranked_above_the_true_one_halves_the_ap() -> None:
    result = _score({1: _truth([A], [0])}, {1: _detections((FAR, 0.9), (A, 0.8))})
    assert result["voc_AP50_per_class"]["a"] == pytest.approx(50.0)  # recall 1 reached at precision 1/2
    assert result["voc_mAP50"] == pytest.approx(50.0)


def test_a_detection_on_a_difficult_box_is_neither_true_nor_false() -> None:
    truth = {1: _truth([A, B, FAR], [0, 0, 1], ignore=[False, True, True])}
    result = _score(truth, {1: _detections((B, 0.95), (FAR, 0.92), (A, 0.9))})
    # B is ignored; FAR (class b's only box is difficult: a false positive of class a) then A: AP 1/2
    assert result["voc_AP50_per_class"]["a"] == pytest.approx(50.0)
    assert math.isnan(result["voc_AP50_per_class"]["b"])
    assert result["voc_mAP50"] == pytest.approx(50.0)


def test_a_detection_whose_best_box_is_taken_is_a_false_positive_as_in_the_devkit() -> None:
    tall = [0.0, 0.0, 10.0, 12.0]
    # The second detection overlaps A (IoU 0.95, taken) more than the free box `tall` (0.875):
    # the devkit counts it false (COCO would match it to `tall`).
    result = _score({1: _truth([A, tall], [0, 0])}, {1: _detections((A, 0.9), ([0.0, 0.0, 10.0, 10.5], 0.8))})
    assert result["voc_AP50_per_class"]["a"] == pytest.approx(50.0)


def test_eleven_point_and_all_point_ap_on_a_known_case() -> None:
    truth = {1: _truth([A, B], [0, 0])}
    detections = {1: _detections((A, 0.9), (A, 0.8), (B, 0.7))}  # true, duplicate (false), true
    # recall .5 .5 1, precision 1 .5 .667: all-point .5 * 1 + .5 * 2/3; 11-point (6 * 1 + 5 * 2/3) / 11
    assert _score(truth, detections)["voc_mAP50"] == pytest.approx(100 * 5 / 6)
    assert _score(truth, detections, use_07_metric=True)["voc_mAP50"] == pytest.approx(100 * 28 / 33)
    assert average_precision(np.asarray([True] * 3 + [False] * 7), 10, use_07_metric=True) == pytest.approx(4 / 11)


def _random_case(seed: int) -> tuple[dict[int, ImageTruth], dict[int, dict]]:
    """Images of 100x100 with ground-truth boxes in separate 25-pixel cells (no two overlap, so VOC's
    and COCO's matching agree) and jittered, mislabelled and stray detections with distinct scores."""
    rng = np.random.default_rng(seed)
    truth, predictions = {}, {}
    for image_id in range(1, 31):
        cells = rng.choice(16, size=rng.integers(0, 5), replace=False)
        boxes = [[25 * (c % 4) + rng.uniform(1, 5), 25 * (c // 4) + rng.uniform(1, 5)] for c in cells]
        boxes = [[x, y, x + rng.uniform(10, 18), y + rng.uniform(10, 18)] for x, y in boxes]
        labels = rng.integers(0, 3, len(boxes)).tolist()
        truth[image_id] = _truth(boxes, labels)
        found = [(np.asarray(b) + rng.uniform(-3, 3, 4), lab if rng.random() < 0.9 else int(rng.integers(0, 3)))
                 for b, lab in zip(boxes, labels) if rng.random() < 0.8]
        found += [(np.r_[xy, xy + rng.uniform(5, 20, 2)], int(rng.integers(0, 3)))
                  for xy in rng.uniform(0, 80, (int(rng.integers(0, 4)), 2))]
        predictions[image_id] = {"boxes": np.asarray([b for b, _ in found]).reshape(-1, 4),
                                 "scores": rng.random(len(found)), "labels": np.asarray([lab for _, lab in found])}
    return truth, predictions


@pytest.mark.parametrize("seed", [0, 1])
def test_voc_ap50_agrees_with_pycocotools_where_only_the_interpolation_differs(seed: int) -> None:
    truth, predictions = _random_case(seed)
    ground_truth = {
        "images": [{"id": i, "width": 100, "height": 100} for i in truth],
        "annotations": [{"image_id": i, "category_id": label + 1, "bbox": [x0, y0, x1 - x0, y1 - y0]}
                        for i, t in truth.items()
                        for (x0, y0, x1, y1), label in zip(t.boxes.tolist(), t.labels.tolist())],
        "categories": [{"id": c} for c in (1, 2, 3)],
    }
    coco = CocoDetectionMetric(ground_truth, [1, 2, 3])
    coco.update(list(predictions), list(predictions.values()))
    voc = _score(truth, predictions, classes=("a", "b", "c"))["voc_mAP50"]
    # COCO samples the precision envelope at 101 recall points, VOC integrates it: within a point or so.
    assert voc == pytest.approx(coco.compute()["AP50"], abs=1.0)
    assert 20 < voc < 95  # a case with both hits and misses


def _devkit_ap(truth: dict[int, ImageTruth], predictions: dict[int, dict], label: int) -> float:
    """The devkit's VOCevaldet loop, transcribed: one detection at a time over all images, by score."""
    found = [(image_id, box, score) for image_id, p in predictions.items()
             for box, score, lab in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()) if lab == label]
    found.sort(key=lambda d: -d[2])
    taken = {image_id: [False] * len(t.labels) for image_id, t in truth.items()}
    tp, fp = [], []
    for image_id, (x0, y0, x1, y1), _ in found:
        t = truth[image_id]
        best, best_iou = -1, -math.inf
        for j, ((g0, h0, g1, h1), lab) in enumerate(zip(t.boxes.tolist(), t.labels.tolist())):
            iw, ih = min(x1, g1) - max(x0, g0), min(y1, h1) - max(y0, h0)
            if lab == label and iw > 0 and ih > 0:
                iou = iw * ih / ((x1 - x0) * (y1 - y0) + (g1 - g0) * (h1 - h0) - iw * ih)
                best, best_iou = (j, iou) if iou > best_iou else (best, best_iou)
        if best_iou >= 0.5 and t.ignore[best]:
            tp.append(0), fp.append(0)
        elif best_iou >= 0.5 and not taken[image_id][best]:
            taken[image_id][best] = True
            tp.append(1), fp.append(0)
        else:
            tp.append(0), fp.append(1)
    positives = sum(int(np.sum((t.labels == label) & ~t.ignore)) for t in truth.values())
    recall = np.cumsum(tp) / positives
    precision = np.cumsum(tp) / np.maximum(np.cumsum(tp) + np.cumsum(fp), np.finfo(float).eps)
    mrec, mpre = np.r_[0, recall, 1], np.r_[0, precision, 0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return 100 * float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def test_the_vectorised_metric_equals_the_devkit_loop_with_difficult_and_overlapping_boxes() -> None:
    rng = np.random.default_rng(7)
    truth, predictions = {}, {}
    for image_id in range(20):
        corners = rng.uniform(0, 40, (int(rng.integers(0, 6)), 2))  # boxes that overlap each other
        boxes = np.c_[corners, corners + rng.uniform(8, 20, corners.shape)]
        truth[image_id] = _truth(boxes.tolist(), rng.integers(0, 2, len(boxes)).tolist(),
                                 (rng.random(len(boxes)) < 0.25).tolist())
        n = int(rng.integers(0, 8))
        picked = boxes[rng.integers(0, len(boxes), n)] if len(boxes) else np.zeros((n, 4))
        predictions[image_id] = {"boxes": picked + rng.uniform(-4, 4, (n, 4)), "scores": rng.random(n),
                                 "labels": rng.integers(0, 2, n)}
    result = _score(truth, predictions)
    for label, name in enumerate(("a", "b")):
        assert result["voc_AP50_per_class"][name] == pytest.approx(_devkit_ap(truth, predictions, label))


class _Oracle:
    """A detection "family" whose raw outputs already are `Detections`."""

    def predict(self, outputs, config=None):
        return outputs


def _oracle_batch(reader, dataset) -> tuple[list[Detections], list[dict]]:
    """Every non-difficult ground-truth box as a detection of score 1, with the dataset's targets."""
    outputs, targets = [], []
    for index in range(len(reader)):
        record = reader[index]
        keep = [i for i, hard in enumerate(record.get("difficult") or [0] * len(record["boxes"])) if not hard]
        boxes = torch.tensor([record["boxes"][i] for i in keep], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        outputs.append(Detections(boxes, torch.ones(len(keep)), torch.tensor([record["labels"][i] for i in keep])))
        targets.append(dataset[index][1])
    return outputs, targets


def test_detection_metric_adds_voc_map50_on_voc_data(tmp_path: Path) -> None:
    pack_voc_split(voc_tree(tmp_path / "src"), tmp_path / "dst", "train")
    dataset = DetectionDataset(tmp_path / "dst" / "train_lmdb")
    metric = DetectionMetric(_Oracle(), dataset)
    metric.update(*_oracle_batch(dataset.reader, dataset))
    result = metric.compute()
    assert result["voc_mAP50"] == pytest.approx(100.0) and result["AP50"] == pytest.approx(100.0)
    assert all(isinstance(value, float) for value in result.values())  # what the trainer logs and compares
    figure, per_class = metric.per_class()  # what `hat eval` prints under the metrics
    assert figure == "AP50 (VOC)"
    assert per_class["aeroplane"] == pytest.approx(100.0) and per_class["tvmonitor"] == pytest.approx(100.0)
    assert per_class["person"] is None  # its only box is difficult


def test_detection_metric_on_coco_data_has_no_voc_entry(tmp_path: Path) -> None:
    _pack_coco(_coco_source(tmp_path / "src"), tmp_path / "dst")
    dataset = DetectionDataset(tmp_path / "dst" / "val_lmdb")
    metric = DetectionMetric(_Oracle(), dataset)
    metric.update(*_oracle_batch(open_packed(tmp_path / "dst" / "val_lmdb"), dataset))
    assert "voc_mAP50" not in metric.compute() and metric.per_class()[1] == {}


def test_merge_across_ranks_gathers_both_metrics_detections(tmp_path: Path, monkeypatch) -> None:
    from hatcli.engine import distributed

    pack_voc_split(voc_tree(tmp_path / "src"), tmp_path / "dst", "train")
    dataset = DetectionDataset(tmp_path / "dst" / "train_lmdb")
    metric = DetectionMetric(_Oracle(), dataset)
    metric.update(*_oracle_batch(dataset.reader, dataset))
    coco_before, voc_before = len(metric.coco.results), len(metric.voc.detections)
    monkeypatch.setattr(distributed, "current", lambda: distributed.DistInfo(0, 2, 0, "gloo"))
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object",
                        lambda out, obj: out.__setitem__(slice(None), [obj, copy.deepcopy(obj)]))
    metric.merge_across_ranks()
    assert len(metric.coco.results) == 2 * coco_before and len(metric.voc.detections) == 2 * voc_before
    assert metric.compute()["voc_mAP50"] == pytest.approx(100.0)  # the copies come after: recall 1 at precision 1
