"""FCOS training loss: sigmoid focal loss, GIoU loss weighted by centerness, centerness BCE.

- classification: sigmoid focal loss (alpha 0.25, gamma 2) over every point and class, the
  target one-hot for positives, summed and divided by the number of positives (at least 1);
- regression: ``1 - GIoU`` between each positive's decoded box and its assigned box, weighted
  by the centerness target, divided by the sum of those weights (FCOS);
- centerness: binary cross-entropy with logits on positives, divided by the number of positives.

The total is ``cls_weight * cls + reg_weight * reg + ctr_weight * ctr``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hat_fcos_efficientnet.targets import (
    EPS,
    assign,
    centerness_target,
    decode_boxes,
    focal_terms,
    iou_giou,
    level_points,
    pad_targets,
)


@dataclass
class FlatOutputs:
    """The head maps of a batch flattened over levels: points in `level_points` order."""

    cls: torch.Tensor
    """[B, P, C] class logits."""
    bbox: torch.Tensor
    """[B, P, 4] raw ltrb regression (in strides, before the ReLU)."""
    ctr: torch.Tensor
    """[B, P] centerness logits."""
    points: torch.Tensor
    strides: torch.Tensor
    input_size: tuple[int, int]
    """(h, w) of the input the maps came from: the finest level's size times its stride."""


def flatten_outputs(outputs: Any, strides: list[int]) -> FlatOutputs:
    """Split the deploy model's flat tuple (cls per level, bbox per level, ctr per level) and flatten it."""
    outputs = list(outputs)
    levels = len(outputs) // 3
    if levels * 3 != len(outputs) or levels > len(strides):
        raise ValueError(f"expected 3 maps per level for at most {len(strides)} levels, got {len(outputs)} outputs")
    cls_maps, bbox_maps, ctr_maps = outputs[:levels], outputs[levels:2 * levels], outputs[2 * levels:]

    def flat(maps: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)

    shapes = [(int(m.shape[-2]), int(m.shape[-1])) for m in cls_maps]
    points, point_strides = level_points(shapes, strides[:levels], cls_maps[0].device)
    size = (shapes[0][0] * strides[0], shapes[0][1] * strides[0])
    return FlatOutputs(flat(cls_maps), flat(bbox_maps), flat(ctr_maps)[..., 0], points, point_strides, size)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Elementwise sigmoid focal loss (Lin et al., 2017) of `logits` against 0/1 `targets`."""
    pos, neg = focal_terms(logits, alpha, gamma)
    return torch.where(targets > 0, pos, neg)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise ``1 - GIoU`` of XYXY boxes (0 for identical boxes, up to 2)."""
    return 1 - iou_giou(pred, target)[1]


@dataclass(frozen=True)
class LossSettings:
    """What the loss and the assignment read from the `[model]` table."""

    center_radius: float = 1.5
    topk: int = 10
    reg_cost_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    cls_weight: float = 1.0
    reg_weight: float = 1.0
    ctr_weight: float = 1.0


def fcos_loss(outputs: Any, targets: list[dict[str, Any]], strides: list[int],
              settings: LossSettings = LossSettings()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of a batch and its parts (`cls`, `reg`, `ctr`, `num_pos`)."""
    flat = flatten_outputs(outputs, strides)
    cls, ctr = flat.cls.float(), flat.ctr.float()
    pred_boxes = decode_boxes(flat.points, flat.strides, flat.bbox.float())
    gt_boxes, gt_labels, gt_valid = pad_targets(targets, cls.device)
    match = assign(cls.detach(), pred_boxes.detach(), flat.points, flat.strides, gt_boxes, gt_labels, gt_valid,
                   center_radius=settings.center_radius, topk=settings.topk, reg_cost_weight=settings.reg_cost_weight,
                   alpha=settings.focal_alpha, gamma=settings.focal_gamma)
    positive = match.positive
    num_pos = positive.sum().clamp(min=1).float()

    cls_target = torch.zeros_like(cls)
    cls_target[positive, match.labels[positive]] = 1.0
    cls_loss = sigmoid_focal_loss(cls, cls_target, settings.focal_alpha, settings.focal_gamma).sum() / num_pos

    points = flat.points[None].expand(positive.shape[0], -1, -1)[positive]
    ctr_target = centerness_target(points, match.boxes[positive])
    weight = ctr_target.sum().clamp(min=EPS)
    reg_loss = (giou_loss(pred_boxes[positive], match.boxes[positive]) * ctr_target).sum() / weight
    ctr_loss = F.binary_cross_entropy_with_logits(ctr[positive], ctr_target, reduction="sum") / num_pos

    total = settings.cls_weight * cls_loss + settings.reg_weight * reg_loss + settings.ctr_weight * ctr_loss
    if not bool(positive.any()):
        # keep the regression and centerness maps in the graph, so DistributedDataParallel sees a
        # gradient (zero) for every parameter even on a batch without boxes
        total = total + 0.0 * (flat.bbox.sum() + ctr.sum())
    return total, {"cls": cls_loss.detach(), "reg": reg_loss.detach(), "ctr": ctr_loss.detach(),
                   "num_pos": positive.sum().detach()}
