"""FCOS points, box decoding and HAT's dynamic top-k target assignment (`DynamicFcosTarget`).

Every location of every level is a point at ``((j + 0.5) * s, (i + 0.5) * s)`` in input pixels
(`s` its level's stride). A point regresses the distances (l, t, r, b) to the sides of its box in
units of `s`; the box is ``point -/+ relu(raw) * s`` (`decode_boxes`).

Assignment, for a batch at once (images padded to the same number of boxes with a mask):

1. candidates: a point is a candidate of a box when it lies inside the box and within
   ``center_radius * s`` of the box centre on both axes (FCOS center sampling, radius 1.5);
2. cost of (point, box) = classification cost + ``reg_cost_weight`` x (1 - GIoU), where the
   classification cost is the sigmoid focal loss the point's class logits would get with the
   box's label as target (summed over classes), and the GIoU is between the box and the point's
   decoded prediction; non-candidates cost `INF`;
3. each box takes ``k = max(1, int(sum of its top-q IoUs))`` points of lowest cost among its
   candidates (q = `topk`; IoU of the box with the candidates' predicted boxes);
4. a point taken by several boxes goes to the one it costs least.

Points of no box are background. A box with no candidate (smaller than a stride-8 cell and
missing every point centre) gets no positive; an image with no box gives only background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

INF = 1e8
EPS = 1e-7


def level_points(shapes: list[tuple[int, int]], strides: list[int], device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of all levels, level by level in row-major order: (xy [P, 2], stride of each [P])."""
    points, point_strides = [], []
    for (h, w), s in zip(shapes, strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
        point_strides.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(point_strides)


def decode_boxes(points: torch.Tensor, strides: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """XYXY boxes from raw ltrb regression [..., P, 4]: ``point -/+ relu(raw) * stride``."""
    d = torch.relu(raw) * strides[:, None]
    return torch.cat([points - d[..., :2], points + d[..., 2:]], dim=-1)


def iou_giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise (broadcast) IoU and generalized IoU of XYXY boxes [..., 4]."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=EPS)
    enclose_wh = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    enclose = enclose_wh[..., 0] * enclose_wh[..., 1]
    return iou, iou - (enclose - union) / enclose.clamp(min=EPS)


def centerness_target(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of points inside boxes: ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))``."""
    lt = points - boxes[..., :2]
    rb = boxes[..., 2:] - points
    lr = torch.stack([lt[..., 0], rb[..., 0]], -1).clamp(min=0)
    tb = torch.stack([lt[..., 1], rb[..., 1]], -1).clamp(min=0)
    ratio = (lr.min(-1).values / lr.max(-1).values.clamp(min=EPS)) * (tb.min(-1).values / tb.max(-1).values.clamp(min=EPS))
    return ratio.sqrt()


def pad_targets(targets: list[dict[str, Any]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack the images' boxes into (boxes [B, M, 4], labels [B, M], valid mask [B, M]), M = most boxes."""
    most = max([int(t["boxes"].shape[0]) for t in targets] + [1])
    boxes = torch.zeros(len(targets), most, 4, device=device)
    labels = torch.zeros(len(targets), most, dtype=torch.int64, device=device)
    valid = torch.zeros(len(targets), most, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = int(t["boxes"].shape[0])
        if n:
            boxes[i, :n] = t["boxes"].to(device=device, dtype=torch.float32)
            labels[i, :n] = t["labels"].to(device=device)
            valid[i, :n] = True
    return boxes, labels, valid


def focal_terms(logits: torch.Tensor, alpha: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element sigmoid focal loss with target 1 (`pos`) and with target 0 (`neg`)."""
    p = logits.sigmoid()
    pos = alpha * (1 - p).pow(gamma) * torch.nn.functional.softplus(-logits)  # -log(p)
    neg = (1 - alpha) * p.pow(gamma) * torch.nn.functional.softplus(logits)  # -log(1 - p)
    return pos, neg


@dataclass
class Assignment:
    """Result of `assign`: per point its box index (-1: background), and the matched box and label."""

    gt_index: torch.Tensor
    """[B, P] int64, index into the image's boxes, -1 for background."""
    positive: torch.Tensor
    """[B, P] bool."""
    boxes: torch.Tensor
    """[B, P, 4] the assigned box (zeros for background)."""
    labels: torch.Tensor
    """[B, P] int64 the assigned label (0 for background; use `positive`)."""


@torch.no_grad()
def assign(cls_logits: torch.Tensor, pred_boxes: torch.Tensor, points: torch.Tensor, strides: torch.Tensor,
           gt_boxes: torch.Tensor, gt_labels: torch.Tensor, gt_valid: torch.Tensor, *, center_radius: float = 1.5,
           topk: int = 10, reg_cost_weight: float = 2.0, alpha: float = 0.25, gamma: float = 2.0) -> Assignment:
    """Dynamic top-k assignment of points to boxes (module docstring).

    `cls_logits` [B, P, C], `pred_boxes` [B, P, 4] (decoded, XYXY), `points` [P, 2], `strides` [P],
    `gt_boxes` [B, M, 4], `gt_labels` [B, M], `gt_valid` [B, M].
    """
    batch, num_points, _ = cls_logits.shape
    cls_logits, pred_boxes = cls_logits.float(), pred_boxes.float()
    px, py = points[None, :, None, 0], points[None, :, None, 1]  # [1, P, 1]
    x1, y1, x2, y2 = (gt_boxes[:, None, :, i] for i in range(4))  # [B, 1, M]
    radius = center_radius * strides[None, :, None]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    inside_box = (px > x1) & (px < x2) & (py > y1) & (py < y2)
    inside_center = ((px - cx).abs() < radius) & ((py - cy).abs() < radius)
    candidate = inside_box & inside_center & gt_valid[:, None, :]  # [B, P, M]

    pos, neg = focal_terms(cls_logits, alpha, gamma)  # [B, P, C]
    index = gt_labels[:, None, :].expand(batch, num_points, -1)
    cls_cost = neg.sum(-1, keepdim=True) - neg.gather(2, index) + pos.gather(2, index)
    iou, giou = iou_giou(pred_boxes[:, :, None, :], gt_boxes[:, None, :, :])
    cost = torch.where(candidate, cls_cost + reg_cost_weight * (1 - giou), torch.full_like(giou, INF))

    q = min(topk, num_points)
    k = (iou * candidate).topk(q, dim=1).values.sum(1).int().clamp(min=1)  # [B, M]
    kmax = int(k.max()) if k.numel() else 1
    lowest_cost, lowest = cost.topk(min(kmax, num_points), dim=1, largest=False)  # [B, kmax, M]
    rank = torch.arange(lowest.shape[1], device=cost.device)[None, :, None]
    chosen = (rank < k[:, None, :]) & (lowest_cost < INF)
    matched = torch.zeros_like(candidate)
    matched.scatter_(1, lowest, chosen)  # top-k indices are distinct within a box: no write collides

    best_cost, best = torch.where(matched, cost, torch.full_like(cost, INF)).min(dim=2)
    positive = best_cost < INF
    gt_index = torch.where(positive, best, torch.full_like(best, -1))
    safe = gt_index.clamp(min=0)
    boxes = torch.gather(gt_boxes, 1, safe[..., None].expand(-1, -1, 4)) * positive[..., None]
    labels = torch.gather(gt_labels, 1, safe) * positive
    return Assignment(gt_index=gt_index, positive=positive, boxes=boxes, labels=labels)
