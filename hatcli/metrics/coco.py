"""COCO box mAP (pycocotools' COCOeval, iouType ``bbox``), as percentages (0-100).

Usage::

    from hatcli.data.datasets import coco_ground_truth
    from hatcli.data.lmdb_format import open_packed

    reader = open_packed("data/val_lmdb")
    metric = CocoDetectionMetric(coco_ground_truth(reader), reader.meta["category_ids"])
    for images, targets in loader:
        predictions = model(images)  # [{"boxes": [N, 4] xyxy, "scores": [N], "labels": [N]}, ...]
        metric.update([t["image_id"] for t in targets], predictions)
    metric.compute()  # {"mAP": ..., "AP50": ..., "AP75": ..., "APs": ..., "APm": ..., "APl": ...}

Predicted boxes must be XYXY in the pixel coordinates of the ORIGINAL image (undo any resize
before calling `update`), and labels are the contiguous labels ``0 .. C-1`` of the packed data;
``category_ids[label]`` maps them back to COCO category ids.

The score covers every image of the ground truth, not only the images passed to `update`: an
image that never got predictions counts as all-missed. COCOeval keeps at most 100 detections
per image (its largest ``maxDets``), the highest scoring ones, so keep at least that many.
A value COCOeval cannot compute (-1: e.g. no ground-truth objects of that size) comes back as
``nan``. pycocotools prints progress; everything here runs with its stdout silenced.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hatcli.errors import DataError

KEYS = ("mAP", "AP50", "AP75", "APs", "APm", "APl")
"""The result keys, in the order of the first six entries of ``COCOeval.stats``."""


def _silenced() -> contextlib.AbstractContextManager[Any]:
    return contextlib.redirect_stdout(io.StringIO())


def _as_array(value: Any, dtype: type, what: str) -> np.ndarray:
    """A numpy copy of a tensor (any device) or array-like."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise DataError(f"prediction {what} cannot be read as numbers: {exc}") from None


def _copy_ground_truth(ground_truth: dict[str, Any]) -> dict[str, Any]:
    """Copy the parts COCOeval writes to (it adds `ignore` to annotations); fill COCO defaults."""
    for key in ("images", "annotations", "categories"):
        if key not in ground_truth:
            raise DataError(f"COCO ground truth has no `{key}`: build it with `coco_ground_truth`")
    annotations = []
    for index, ann in enumerate(ground_truth["annotations"]):
        ann = dict(ann)
        ann.setdefault("id", index + 1)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        annotations.append(ann)
    return {
        "images": [dict(im) for im in ground_truth["images"]],
        "annotations": annotations,
        "categories": [dict(c) for c in ground_truth["categories"]],
    }


class CocoDetectionMetric:
    """Accumulates box predictions per image and scores them with COCOeval."""

    def __init__(self, ground_truth: dict[str, Any], category_ids: Sequence[int]) -> None:
        """Index `ground_truth` (a dict as returned by `coco_ground_truth`) for COCOeval.

        `category_ids[label]` is the COCO category id of contiguous label `label` (the packed
        data's ``meta["category_ids"]``). The dict is copied, not changed.
        """
        self.gt = COCO()
        self.gt.dataset = _copy_ground_truth(ground_truth)
        with _silenced():
            self.gt.createIndex()
        self.category_ids = [int(c) for c in category_ids]
        unknown = sorted(set(self.category_ids) - set(self.gt.cats))
        if unknown:
            raise DataError(
                f"category ids {unknown} are not among the ground truth's categories "
                f"{sorted(self.gt.cats)}: the metric and the data disagree on the classes"
            )
        self.results: list[dict[str, Any]] = []

    @property
    def num_classes(self) -> int:
        """How many contiguous labels predictions may use."""
        return len(self.category_ids)

    def update(self, image_ids: Sequence[int], predictions: Sequence[dict[str, Any]]) -> None:
        """Add the predictions of one batch; `predictions[i]` belongs to image `image_ids[i]`.

        Each prediction is ``{"boxes": [N, 4] XYXY pixels of the original image, "scores": [N],
        "labels": [N] in 0 .. C-1}`` (tensors or arrays). Raises DataError for an image id the
        ground truth does not hold, a label out of range, or mismatched shapes; nothing of a
        batch that fails is kept. Updating the same image twice adds to its detections.
        """
        if len(image_ids) != len(predictions):
            raise DataError(f"update got {len(image_ids)} image ids but {len(predictions)} predictions")
        entries: list[dict[str, Any]] = []
        for image_id, prediction in zip(image_ids, predictions):
            image_id = int(image_id)
            if image_id not in self.gt.imgs:
                raise DataError(
                    f"image id {image_id} is not in the ground truth ({len(self.gt.imgs)} images): "
                    "predictions and ground truth come from different data"
                )
            missing = [k for k in ("boxes", "scores", "labels") if k not in prediction]
            if missing:
                raise DataError(f"prediction for image {image_id} lacks {missing}")
            boxes = _as_array(prediction["boxes"], np.float64, "boxes")
            scores = _as_array(prediction["scores"], np.float64, "scores").reshape(-1)
            labels = _as_array(prediction["labels"], np.int64, "labels").reshape(-1)
            if boxes.size == 0:
                boxes = boxes.reshape(0, 4)
            if boxes.ndim != 2 or boxes.shape[1] != 4 or not len(boxes) == len(scores) == len(labels):
                raise DataError(
                    f"prediction for image {image_id}: boxes {np.shape(prediction['boxes'])}, scores "
                    f"{np.shape(prediction['scores'])} and labels {np.shape(prediction['labels'])} "
                    "must be [N, 4], [N] and [N]"
                )
            bad = labels[(labels < 0) | (labels >= self.num_classes)]
            if bad.size:
                raise DataError(
                    f"prediction for image {image_id} has label {int(bad[0])}, outside 0..{self.num_classes - 1} "
                    f"({self.num_classes} classes)"
                )
            for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
                entries.append({
                    "image_id": image_id,
                    "category_id": self.category_ids[label],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": score,
                })
        self.results.extend(entries)

    def compute(self) -> dict[str, float]:
        """Return ``{"mAP", "AP50", "AP75", "APs", "APm", "APl"}`` in percent over all ground-truth images.

        `mAP` is AP averaged over IoU 0.50:0.95; with no detections at all every AP is 0.0
        (nan where the ground truth has nothing to find). Can be called repeatedly.
        """
        with _silenced():
            if self.results:
                # loadRes writes id/area/iscrowd into the entries it gets: hand it copies.
                dt = self.gt.loadRes([dict(r) for r in self.results])
            else:  # loadRes refuses an empty list; an empty result set scores 0 the same way
                dt = COCO()
                dt.dataset = {"images": list(self.gt.dataset["images"]), "annotations": [],
                              "categories": list(self.gt.dataset["categories"])}
                dt.createIndex()
            evaluator = COCOeval(self.gt, dt, iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return {
            key: (math.nan if value < 0 else 100.0 * float(value))
            for key, value in zip(KEYS, evaluator.stats[:6])
        }
