"""Loss terms on inputs whose values are known by hand."""

from __future__ import annotations

import math

import torch

from hat_fcos_efficientnet.losses import LossSettings, fcos_loss, giou_loss, sigmoid_focal_loss
from hat_fcos_efficientnet.targets import centerness_target


def test_focal_loss_of_a_zero_logit():
    # p = 0.5: positive alpha (1 - p)^2 (-log p), negative (1 - alpha) p^2 (-log(1 - p))
    loss = sigmoid_focal_loss(torch.zeros(2), torch.tensor([1.0, 0.0]))
    expected = [0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)]
    assert torch.allclose(loss, torch.tensor(expected))
    confident = sigmoid_focal_loss(torch.tensor([4.0]), torch.tensor([1.0]))
    assert confident < 1e-4  # well-classified examples are down-weighted


def test_giou_loss_is_zero_for_identical_boxes_and_known_for_disjoint_ones():
    box = torch.tensor([[1.0, 2.0, 5.0, 7.0]])
    assert giou_loss(box, box).item() == 0.0
    # IoU 0, union 2, enclosing box 3: GIoU = -1/3, loss 4/3
    loss = giou_loss(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 3.0, 1.0]]))
    assert torch.allclose(loss, torch.tensor([4 / 3]))


def test_centerness_is_one_at_the_box_centre_and_lower_off_it():
    box = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    assert centerness_target(torch.tensor([[2.0, 2.0]]), box).item() == 1.0
    # l = 1, r = 3, t = b = 2: sqrt(1/3 * 1)
    assert torch.allclose(centerness_target(torch.tensor([[1.0, 2.0]]), box), torch.tensor([math.sqrt(1 / 3)]))


def _maps(cls_value: float, box_raw: float, ctr_value: float, size: int = 64, classes: int = 2):
    """Constant head maps of five levels for one `size` x `size` image."""
    strides = [8, 16, 32, 64, 128]
    shapes = [max(1, size // s) for s in strides]
    cls = [torch.full((1, classes, n, n), cls_value, requires_grad=True) for n in shapes]
    bbox = [torch.full((1, 4, n, n), box_raw, requires_grad=True) for n in shapes]
    ctr = [torch.full((1, 1, n, n), ctr_value, requires_grad=True) for n in shapes]
    return (*cls, *bbox, *ctr), strides


def test_an_image_without_boxes_gives_only_the_background_focal_loss():
    outputs, strides = _maps(-2.0, 1.0, 0.0)
    total, parts = fcos_loss(outputs, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}], strides)
    points = 8 * 8 + 4 * 4 + 2 * 2 + 1 + 1
    expected = points * 2 * sigmoid_focal_loss(torch.tensor(-2.0), torch.tensor(0.0))  # divided by max(1, 0 positives)
    assert torch.allclose(total, expected) and parts["num_pos"] == 0
    total.backward()
    assert outputs[5].grad is not None  # box maps stay in the graph (zero gradient)


def test_loss_weights_scale_their_terms():
    outputs, strides = _maps(0.0, 1.0, 0.0)
    target = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    _, parts = fcos_loss(outputs, target, strides)
    assert parts["num_pos"] >= 1 and parts["reg"] > 0 and parts["ctr"] > 0
    weighted, _ = fcos_loss(outputs, target, strides, LossSettings(cls_weight=0.0, reg_weight=2.0, ctr_weight=0.5))
    assert torch.allclose(weighted, 2.0 * parts["reg"] + 0.5 * parts["ctr"])
