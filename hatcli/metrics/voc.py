"""Pascal VOC detection AP at IoU 0.5 (the devkit's ``VOCevaldet``), as percentages (0-100).

Why it is written here: VOC's number is not COCO's AP50. The devkit ignores ``difficult`` ground
truth (a detection matched to one is neither a true nor a false positive), matches a detection to
the ground-truth box it overlaps most even when that box is already taken (then it is a false
positive; COCO moves on to the next free box), and integrates precision over every recall point
(VOC2010+) or 11 recall points (VOC2007), where COCO samples 101. pycocotools and torchmetrics
implement COCO's rules only, so this small module implements the devkit's.

Usage::

    reader = open_packed("data/voc/val_lmdb")
    metric = VocDetectionMetric.from_reader(reader)
    metric.update(image_ids, predictions)  # as CocoDetectionMetric.update: XYXY original pixels
    metric.compute()  # {"voc_mAP50": 71.3, "voc_AP50_per_class": {"aeroplane": 80.1, ...}}

How it scores, per class: all detections of the class are sorted by score (a stable sort: ties
keep the order they were added in); in each image, each detection in that order is matched to
the ground-truth box it overlaps most; IoU >= 0.5 with a box not matched before is a true
positive, with a matched box or below 0.5 a false positive, with a difficult (or crowd) box
nothing. IoU is computed in hat's continuous pixel frame, which is the devkit's ``+ 1`` formula
on its 1-based inclusive coordinates. A class with no non-difficult ground-truth box has no AP
(nan in the per-class table) and is left out of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hatcli.errors import DataError

IOU_THRESHOLD = 0.5


@dataclass
class ImageTruth:
    """One image's ground truth: `boxes` float [N, 4] XYXY pixels, `labels` int [N], `ignore` bool [N]
    (difficult or crowd: matched detections are not counted)."""

    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray


def wants_voc_metric(reader: Any) -> bool:
    """Whether packed detection data is scored with the VOC metric too: its meta ``source`` is
    ``voc``, or its records carry the ``difficult`` flag (a packer writes it on every record, so
    the first one tells)."""
    if reader.meta.get("source") == "voc":
        return True
    return len(reader) > 0 and "difficult" in reader[0]


def voc_ground_truth(records: Iterable[dict[str, Any]]) -> dict[int, ImageTruth]:
    """The ground truth of packed detection records (a `PackedReader` or any iterable of records), by image id."""
    truth: dict[int, ImageTruth] = {}
    for record in records:
        boxes = np.asarray(record["boxes"], dtype=np.float64).reshape(-1, 4).copy()
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        count = len(boxes)
        difficult = np.asarray(record.get("difficult") or [0] * count, dtype=bool)
        crowd = np.asarray(record.get("iscrowd") or [0] * count, dtype=bool)
        truth[int(record["image_id"])] = ImageTruth(boxes, np.asarray(record["labels"], dtype=np.int64).reshape(-1),
                                                    difficult | crowd)
    return truth


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of every XYXY box of `boxes` [N, 4] with every one of `others` [M, 4]: [N, M]."""
    lo = np.maximum(boxes[:, None, :2], others[None, :, :2])
    hi = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    area_others = np.prod(others[:, 2:] - others[:, :2], axis=1)
    union = area[:, None] + area_others[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_image(boxes: np.ndarray, truth_boxes: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """The devkit's greedy matching in one image and class: 1 (true positive), 0 (false positive)
    or -1 (on an ignored box) for each of `boxes`, which are in descending score order."""
    outcome = np.zeros(len(boxes), dtype=np.int8)
    if not len(truth_boxes):
        return outcome
    iou = box_iou(boxes, truth_boxes)
    best = iou.argmax(axis=1)  # over all boxes, matched or not, as the devkit does
    hit = iou[np.arange(len(boxes)), best] >= IOU_THRESHOLD
    outcome[hit & ignore[best]] = -1
    counted = np.flatnonzero(hit & ~ignore[best])
    # The first (highest-scoring) hit on a box takes it; later hits on it are false positives.
    _, first = np.unique(best[counted], return_index=True)
    outcome[counted[first]] = 1
    return outcome


def average_precision(true_positive: np.ndarray, positives: int, use_07_metric: bool = False) -> float:
    """AP (0-1) of detections in descending score order (`true_positive`: bool each) against
    `positives` ground-truth boxes: the area under the precision envelope at every recall point
    (VOC2010+), or with `use_07_metric` the mean of the best precision at recall >= 0, 0.1, .., 1."""
    true_positive = np.asarray(true_positive, dtype=bool)
    tp = np.cumsum(true_positive)
    recall = tp / positives
    precision = tp / np.arange(1, len(tp) + 1)
    if use_07_metric:
        thresholds = np.arange(11) / 10  # exact tenths: a recall of 3/10 reaches the threshold 0.3
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in thresholds]))
    recall = np.concatenate([[0.0], recall, [1.0]])
    envelope = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def _as_array(value: Any, dtype: type) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


class VocDetectionMetric:
    """Accumulates box predictions per image and scores them as the VOC devkit does."""

    def __init__(self, ground_truth: dict[int, ImageTruth], class_names: Sequence[str],
                 use_07_metric: bool = False) -> None:
        """`ground_truth` by image id (`voc_ground_truth`); label i is `class_names[i]`.

        `use_07_metric`: VOC2007's 11-point AP instead of the all-point AP of VOC2010 and later.
        """
        self.ground_truth = ground_truth
        self.class_names = list(class_names)
        self.use_07_metric = use_07_metric
        self.detections: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        """(image id, boxes [N, 4] XYXY, scores [N], labels [N]) per `update`d image, in order."""
        counted = [t.labels[~t.ignore] for t in ground_truth.values()]
        self.positives = np.bincount(np.concatenate([np.zeros(0, np.int64), *counted]),
                                     minlength=len(self.class_names))
        """How many ground-truth boxes of each label count (neither difficult nor crowd)."""

    @classmethod
    def from_reader(cls, reader: Any, use_07_metric: bool = False) -> VocDetectionMetric:
        """The metric over packed detection data (a `PackedReader`): its records and class names."""
        records = (reader[index] for index in range(len(reader)))
        return cls(voc_ground_truth(records), reader.meta["classes"], use_07_metric)

    def update(self, image_ids: Sequence[int], predictions: Sequence[dict[str, Any]]) -> None:
        """Add the predictions of one batch: ``predictions[i]`` (``{"boxes": [N, 4] XYXY pixels of the
        original image, "scores": [N], "labels": [N] in 0 .. C-1}``) belongs to image ``image_ids[i]``.

        Raises DataError for an image the ground truth does not hold, a label out of range, or
        mismatched shapes; nothing of a batch that fails is kept.
        """
        if len(image_ids) != len(predictions):
            raise DataError(f"update got {len(image_ids)} image ids but {len(predictions)} predictions")
        batch = []
        for image_id, prediction in zip(image_ids, predictions):
            image_id = int(image_id)
            if image_id not in self.ground_truth:
                raise DataError(f"image id {image_id} is not in the ground truth ({len(self.ground_truth)} images): "
                                "predictions and ground truth come from different data")
            try:
                boxes = _as_array(prediction["boxes"], np.float64).reshape(-1, 4)
                scores = _as_array(prediction["scores"], np.float64).reshape(-1)
                labels = _as_array(prediction["labels"], np.int64).reshape(-1)
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"prediction for image {image_id} is not {{boxes [N, 4], scores [N], labels [N]}}: "
                                f"{exc}") from None
            if not len(boxes) == len(scores) == len(labels):
                raise DataError(f"prediction for image {image_id}: {len(boxes)} boxes, {len(scores)} scores and "
                                f"{len(labels)} labels")
            if len(labels) and not 0 <= labels.min() <= labels.max() < len(self.class_names):
                raise DataError(f"prediction for image {image_id} has a label outside 0..{len(self.class_names) - 1}")
            batch.append((image_id, boxes, scores, labels))
        self.detections.extend(batch)

    def _class_outcomes(self, label: int, image_ids: np.ndarray, boxes: np.ndarray,
                        scores: np.ndarray) -> np.ndarray:
        """Each detection of class `label` (all given ones) as 1/0/-1 (`match_image`) in descending score order."""
        order = np.argsort(-scores, kind="stable")
        image_ids, boxes = image_ids[order], boxes[order]
        outcome = np.zeros(len(order), dtype=np.int8)
        by_image = np.argsort(image_ids, kind="stable")  # keeps score order within each image
        starts = np.flatnonzero(np.r_[True, image_ids[by_image][1:] != image_ids[by_image][:-1]])
        for group in np.split(by_image, starts[1:]) if len(by_image) else []:
            truth = self.ground_truth[int(image_ids[group[0]])]
            of_class = truth.labels == label
            if of_class.any():  # else every detection stays a false positive
                outcome[group] = match_image(boxes[group], truth.boxes[of_class], truth.ignore[of_class])
        return outcome

    def compute(self) -> dict[str, Any]:
        """``{"voc_mAP50": percent, "voc_AP50_per_class": {class name: percent}}`` over all
        ground-truth images; a class without non-difficult ground truth is nan and left out of
        the mean (nan when no class has any). Can be called repeatedly."""
        if self.detections:
            image_ids = np.concatenate([np.full(len(d[2]), d[0], dtype=np.int64) for d in self.detections])
            boxes = np.concatenate([d[1] for d in self.detections])
            scores = np.concatenate([d[2] for d in self.detections])
            labels = np.concatenate([d[3] for d in self.detections])
        else:
            image_ids, boxes, scores, labels = (np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0),
                                                np.zeros(0, np.int64))
        per_class = {}
        for label, name in enumerate(self.class_names):
            mine = labels == label
            outcome = self._class_outcomes(label, image_ids[mine], boxes[mine], scores[mine])
            positives = int(self.positives[label])
            per_class[name] = (100.0 * average_precision(outcome[outcome >= 0] == 1, positives, self.use_07_metric)
                               if positives else math.nan)
        scored = [ap for ap in per_class.values() if not math.isnan(ap)]
        return {"voc_mAP50": sum(scored) / len(scored) if scored else math.nan, "voc_AP50_per_class": per_class}
