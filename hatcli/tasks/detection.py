"""What every detection family shares: detections in original-image pixels, COCO mAP, drawing.

A detection family's deploy model returns a flat tuple of tensors (its raw head maps, one per
output name in `output_names`); it holds neither the loss nor the decoder, which run on the
host, as on the device. The family decodes them with `predict` into `Detections` in the pixel
coordinates of the image the model saw. `to_original` maps those back onto the original image
through the `image_box` that the packed dataset records for every image: where the original
image's corners landed after the per-image transforms (resize, pad, flip).
"""

from __future__ import annotations

from abc import abstractmethod
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image, ImageDraw, ImageFont

from hatcli.family import FamilyConfig, ModelFamily, TaskKind
from hatcli.tasks.drawing import class_name, readable_canvas


BOX_FRAME = ("XYXY (x0, y0, x1, y1) in pixels of the network input, i.e. of the image after every "
             "`preprocess` step: origin at its top-left corner, x to the right, y down, pixel (i, j) covering "
             "[j, j + 1) x [i, i + 1). To get pixels of the original W x H image, undo `preprocess`: the "
             "bottom-right pad moves nothing; for the resize to W' x H' (`stretch`, or `keep_ratio`: the "
             "sides rounded from W * f, H * f) multiply x by W / W' and y by H / H'; then clip to the image")
"""How every detection family's boxes are placed (what `predict` returns and `to_original` maps
back); a family's `describe_outputs` quotes it."""


@dataclass
class Detections:
    """One image's detections: `boxes` [N, 4] XYXY pixels, `scores` [N], `labels` [N] (0 .. C-1)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.numel())

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The `{"boxes", "scores", "labels"}` dict that `CocoDetectionMetric.update` takes."""
        return {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}


def to_original(detections: Detections, target: dict[str, Any]) -> Detections:
    """Map detections from model-input pixels to the original image's pixels.

    `target["image_box"]` is the original image's extent after the per-image transforms (XYXY in
    input pixels; a flip swaps its corners) and `target["orig_size"]` its (height, width). Any
    combination of scaling, flipping and padding is undone exactly; boxes are clipped to the image.
    """
    height, width = target["orig_size"]
    box = torch.as_tensor(target["image_box"], dtype=torch.float64).reshape(4)
    boxes = detections.boxes.to(torch.float64).reshape(-1, 4)
    sx = width / float(box[2] - box[0])  # negative after a horizontal flip
    sy = height / float(box[3] - box[1])
    xs = (boxes[:, 0::2] - box[0]) * sx
    ys = (boxes[:, 1::2] - box[1]) * sy
    x0, x1 = torch.minimum(xs[:, 0], xs[:, 1]), torch.maximum(xs[:, 0], xs[:, 1])
    y0, y1 = torch.minimum(ys[:, 0], ys[:, 1]), torch.maximum(ys[:, 0], ys[:, 1])
    out = torch.stack([x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)], dim=1)
    return Detections(out.to(torch.float32), detections.scores, detections.labels)


class DetectionMetric:
    """COCO box mAP of a detection family's raw outputs over packed detection data, plus the
    Pascal VOC devkit's AP50 (``voc_mAP50``) on VOC data (`hatcli.metrics.voc.wants_voc_metric`).

    `update(outputs, targets)` decodes a batch with the family, maps the detections back to the
    original images and adds them to a `CocoDetectionMetric` (and a `VocDetectionMetric`); under
    `torch.distributed` every rank's detections are gathered before `compute`.
    """

    def __init__(self, family: DetectionFamily, dataset: Any, config: FamilyConfig | None = None) -> None:
        from hatcli.data.datasets import coco_ground_truth
        from hatcli.metrics.coco import CocoDetectionMetric
        from hatcli.metrics.voc import VocDetectionMetric, wants_voc_metric

        self.family = family
        self.config = config
        self.coco = CocoDetectionMetric(coco_ground_truth(dataset.reader), dataset.reader.meta["category_ids"])
        self.voc = VocDetectionMetric.from_reader(dataset.reader) if wants_voc_metric(dataset.reader) else None

    def update(self, outputs: Any, targets: list[dict[str, Any]]) -> None:
        """Add one batch of raw outputs and its targets."""
        detections = self.family.predict(outputs, config=self.config)
        originals = [to_original(d, t).as_dict() for d, t in zip(detections, targets)]
        image_ids = [int(t["image_id"]) for t in targets]
        self.coco.update(image_ids, originals)
        if self.voc is not None:
            self.voc.update(image_ids, originals)

    def merge_across_ranks(self) -> None:
        """Give every rank all ranks' detections (no-op in a single process)."""
        from hatcli.engine import distributed

        if not distributed.current().enabled:
            return
        import torch.distributed as dist

        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.coco.results, self.voc.detections if self.voc is not None else None))
        self.coco.results = [entry for coco, _ in gathered for entry in coco]
        if self.voc is not None:
            self.voc.detections = [entry for _, voc in gathered for entry in voc]

    def compute(self) -> dict[str, float]:
        """`{"mAP", "AP50", "AP75", "APs", "APm", "APl"}` in percent, and `voc_mAP50` on VOC data."""
        result = self.coco.compute()
        if self.voc is not None:
            result["voc_mAP50"] = self.voc.compute()["voc_mAP50"]
        return result

    def per_class(self) -> tuple[str, dict[str, float | None]]:
        """("AP50 (VOC)", each class's VOC AP50 in percent; None: no non-difficult box of it); no
        classes on data that is not VOC. Not in `compute`, whose values are all plain numbers (the
        trainer logs and compares them)."""
        if self.voc is None:
            return "AP50 (VOC)", {}
        values = self.voc.compute()["voc_AP50_per_class"]
        return "AP50 (VOC)", {name: None if math.isnan(v) else v for name, v in values.items()}


_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255))


class DetectionFamily(ModelFamily):
    """Base for detection families: subclasses build the network, its loss and its decoder."""

    task: ClassVar[TaskKind] = "detection"
    output_names: ClassVar[list[str]] = ["output"]
    """Names of the deploy model's outputs, in the order its forward returns them."""

    def build_metric(self, dataset: Any, config: FamilyConfig | None = None) -> DetectionMetric:
        """COCO mAP over the packed detection `dataset`."""
        return DetectionMetric(self, dataset, config)

    @abstractmethod
    def predict(self, outputs: Any, topk: int = 100, config: FamilyConfig | None = None) -> list[Detections]:
        """Decode a batch of raw outputs into per-image `Detections` (model-input pixels), at most
        `topk` per image, with the decoder settings of `config` (the family's defaults when None)."""

    def describe_outputs(self, config: FamilyConfig, input_size: tuple[int, int],
                         num_classes: int) -> list[dict[str, Any]]:
        """What each raw head map is and how to decode it (the manifest's `output_meaning`).

        A family that wants its artifact usable without hat overrides this with, per output: its
        `shape`, what each axis and value means, its stride, and a `postprocess` table with the
        decoding `predict` applies (docs/formats.md shows FCOS's). Default: a generic entry per
        output that says the family decodes it.
        """
        return [{"name": name, "what": "raw head map", "layout": "NCHW",
                 "decode": f"not boxes yet: the `{self.name}` family decodes these maps on the host into "
                           "boxes (XYXY pixels of the model input), scores and labels (index into `classes`); "
                           "see its documentation"} for name in self.output_names]

    def draw_predictions(self, image: Image.Image, prediction: Detections, class_names: list[str],
                         min_score: float = 0.3) -> Image.Image:
        """Return the image (enlarged to at least 320 px wide) with boxes, class names and scores
        of the detections scoring at least `min_score`. `prediction` is in original-image pixels."""
        canvas, factor = readable_canvas(image, Image.Resampling.BILINEAR)
        font = ImageFont.load_default(size=max(11, canvas.width // 40))
        draw = ImageDraw.Draw(canvas, "RGBA")
        line = max(2, canvas.width // 200)
        # lowest score first, so the best box and its label are drawn on top
        order = torch.argsort(prediction.scores)
        for i in order.tolist():
            score = float(prediction.scores[i])
            if score < min_score:
                continue
            label = int(prediction.labels[i])
            colour = _PALETTE[label % len(_PALETTE)]
            x0, y0, x1, y1 = (float(v) * factor for v in prediction.boxes[i])
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
            text = f"{class_name(class_names, label)} {score * 100:.0f}%"
            tw, th = draw.textlength(text, font=font), font.getbbox("Ag")[3] + 2
            top = y0 - th if y0 >= th else y0
            draw.rectangle((x0, top, x0 + tw + 4, top + th), fill=(*colour, 200))
            draw.text((x0 + 2, top), text, fill=(0, 0, 0), font=font)
        return canvas
