"""FCOS post-processing on the host: scores, top-k, class-aware NMS (HAT's `FCOSDecoder`).

For every point and class the score is ``sigmoid(cls) * sigmoid(centerness)``, or its square
root with `score_sqrt` (HAT's `nms_sqrt=True`, the default: the product of two probabilities is
small, and the root puts it back on the scale of one). Then, per image over all levels:
candidates scoring above `score_threshold` are kept, the best `nms_pre` of them are decoded
(``point -/+ relu(ltrb) * stride``, clipped to the input image), class-aware NMS
(`torchvision.ops.batched_nms`) at `nms_iou` removes duplicates, and the best `max_per_img`
remain. Boxes are in model-input pixels; the core maps them to the original image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.ops import batched_nms

from hatcli.tasks.detection import Detections
from hat_fcos_efficientnet.losses import flatten_outputs
from hat_fcos_efficientnet.targets import decode_boxes


@dataclass(frozen=True)
class DecoderSettings:
    """The `[model]` keys of the decoder, with HAT's defaults."""

    score_threshold: float = 0.05
    nms_pre: int = 1000
    nms_iou: float = 0.6
    max_per_img: int = 100
    score_sqrt: bool = True


def decode(outputs: Any, strides: list[int], settings: DecoderSettings = DecoderSettings(),
           image_sizes: list[tuple[int, int]] | None = None) -> list[Detections]:
    """Decode a batch of raw head maps into per-image `Detections` (module docstring).

    `image_sizes` are the (h, w) to clip each image's boxes to (default: the input size).
    """
    flat = flatten_outputs([torch.as_tensor(o) for o in outputs], strides)
    batch, num_points, num_classes = flat.cls.shape
    scores = flat.cls.float().sigmoid() * flat.ctr.float().sigmoid()[..., None]
    if settings.score_sqrt:
        scores = scores.sqrt()
    boxes = decode_boxes(flat.points, flat.strides, flat.bbox.float())
    k = min(settings.nms_pre, num_points * num_classes)
    top_scores, top_index = scores.reshape(batch, -1).topk(k, dim=1)
    point_index, labels = top_index // num_classes, top_index % num_classes
    top_boxes = torch.gather(boxes, 1, point_index[..., None].expand(-1, -1, 4))
    sizes = image_sizes or [flat.input_size] * batch
    limits = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=top_boxes.dtype, device=top_boxes.device)
    top_boxes = torch.minimum(top_boxes.clamp(min=0), limits[:, None, :])

    keep = top_scores > settings.score_threshold
    image = torch.arange(batch, device=keep.device)[:, None].expand(-1, k)[keep]
    cand_boxes, cand_scores, cand_labels = top_boxes[keep], top_scores[keep], labels[keep]
    # one NMS call for the whole batch: groups are (image, class) pairs
    kept = batched_nms(cand_boxes, cand_scores, image * num_classes + cand_labels, settings.nms_iou)
    results = []
    for b in range(batch):
        mine = kept[image[kept] == b][: settings.max_per_img]  # batched_nms sorts by score, descending
        results.append(Detections(cand_boxes[mine], cand_scores[mine], cand_labels[mine]))
    return results
