"""FCOS post-processing on the host: scores, top-k, class-aware NMS (HAT's `FCOSDecoder`).

For every point and class the score is ``sigmoid(cls) * sigmoid(centerness)``, or its square
root with `score_sqrt` (HAT's `nms_sqrt=True`, the default: the product of two probabilities is
small, and the root puts it back on the scale of one). Then, per image over all levels:
candidates scoring above `score_threshold` are kept, the best `nms_pre` of them are decoded
(``point -/+ relu(ltrb) * stride``, clipped to the input image), class-aware NMS
(`torchvision.ops.batched_nms`) at `nms_iou` removes duplicates, and the best `max_per_img`
remain. Boxes are in model-input pixels; the core maps them to the original image.

`describe` says all of this, per deploy-model output, for a consumer without hat (the artifact
manifest's `output_meaning`); a test decodes real artifact outputs from that description alone
and gets what `decode` gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.ops import batched_nms

from hatcli.tasks.detection import BOX_FRAME, Detections
from hat_fcos_efficientnet.losses import flatten_outputs
from hat_fcos_efficientnet.model import level_shapes, output_names
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


_MAPS = {
    # output kind -> (what, channels axis, values); `{s}` is the level's stride
    "cls": ("class_logits", "c: class, the index into `classes`",
            "logits before the sigmoid: sigmoid(v[n, c, i, j]) is the probability that the point is on an "
            "object of class c"),
    "bbox": ("box_distances", "side: 0 = l (left), 1 = t (top), 2 = r (right), 3 = b (bottom)",
             "distances from the point to the sides of its box, in units of the stride (not pixels), before a "
             "ReLU: the distance in network-input pixels is max(v, 0) * {s}"),
    "ctr": ("centerness_logits", "one channel",
            "centerness logit before the sigmoid: sigmoid(v) says how close the point is to its box's centre "
            "(1 at the centre); it weighs the class probabilities in the score"),
}


def postprocess_spec(settings: DecoderSettings, clip_size: tuple[int, int]) -> dict[str, Any]:
    """What `decode` does with the maps, step by step, with the settings it uses."""
    score = "sigmoid(cls[c]) * sigmoid(ctr)"
    return {
        "method": "FCOS (HAT's FCOSDecoder): per-point class scores, boxes from distances, class-aware NMS",
        "points": "every location (i, j) of every level, level by level from the finest stride, row-major: "
                  "the point (x, y) = ((j + 0.5) * stride, (i + 0.5) * stride)",
        "score": f"sqrt({score})" if settings.score_sqrt else score,
        "box": "(x - l * stride, y - t * stride, x + r * stride, y + b * stride), (l, t, r, b) = max(bbox, 0) "
               "at the point",
        "score_sqrt": settings.score_sqrt, "score_threshold": settings.score_threshold,
        "nms_pre": settings.nms_pre, "nms_iou": settings.nms_iou, "max_per_img": settings.max_per_img,
        "clip_size": list(clip_size),
        "steps": [
            "per image, give every (point, class) pair of every level its `score`",
            "keep the `nms_pre` pairs of highest score over all levels (all of them if there are fewer; "
            "ties in any order)",
            "decode their `box`es and clip them to 0 <= x <= W, 0 <= y <= H, [H, W] = `clip_size` (the "
            "finest level's map size times its stride: the input size when it divides by that stride)",
            "drop the pairs whose score is not above `score_threshold`",
            "class-aware NMS: in decreasing score order, drop a box whose IoU with a box of the same class "
            "already kept is above `nms_iou` (IoU of XYXY boxes, area (x1 - x0) * (y1 - y0); two empty "
            "boxes have IoU 0 / 0, which is not above it: they both stay)",
            "keep the `max_per_img` highest-scoring boxes left: each is a detection with `score` and label c",
        ],
        "boxes": BOX_FRAME,
        "labels": "c, the index into `classes`",
    }


def describe(input_size: tuple[int, int], num_classes: int, strides: list[int],
             settings: DecoderSettings = DecoderSettings()) -> list[dict[str, Any]]:
    """Every deploy-model output, in `output_names` order (the order `decode` splits them in):
    shape, axes, values, stride and the shared `postprocess` table (module docstring)."""
    levels = len(strides)
    shapes = level_shapes(input_size, levels)
    clip_size = (shapes[0][0] * strides[0], shapes[0][1] * strides[0])  # `flatten_outputs`' input_size
    post = postprocess_spec(settings, clip_size)
    names = iter(output_names(levels))
    entries = []
    for kind, channels in (("cls", num_classes), ("bbox", 4), ("ctr", 1)):
        what, channel_axis, values = _MAPS[kind]
        for level, (s, (h, w)) in enumerate(zip(strides, shapes)):
            entries.append({
                "name": next(names), "what": what, "shape": ["N", channels, h, w], "layout": "NCHW",
                "axes": ["n: image of the batch", channel_axis, f"i: row of the stride-{s} grid",
                         f"j: column of the stride-{s} grid"],
                "values": values.format(s=s), "level": level, "stride": s,
                "points": f"location (i, j) is the point ((j + 0.5) * {s}, (i + 0.5) * {s}) in network-input pixels",
                "postprocess": post,
            })
    return entries
