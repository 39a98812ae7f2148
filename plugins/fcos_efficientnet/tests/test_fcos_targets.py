"""Dynamic top-k assignment on hand-made boxes, points and predictions."""

from __future__ import annotations

import torch

from hat_fcos_efficientnet.targets import assign, level_points, pad_targets

STRIDE = 8
POINTS, STRIDES = level_points([(8, 8)], [STRIDE], "cpu")  # 8 x 8 points over a 64 x 64 image, at 4, 12, ..., 60


def point_index(x: float, y: float) -> int:
    """Index of the point at (x, y) in `POINTS`."""
    return int(((POINTS[:, 0] == x) & (POINTS[:, 1] == y)).nonzero())


def run(gt_boxes: list[list[float]], gt_labels: list[int], pred_boxes: torch.Tensor | None = None, classes: int = 3):
    """Assign one image's points, with neutral class logits (0) and the given predicted boxes."""
    targets = [{"boxes": torch.tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(gt_labels)}]
    boxes, labels, valid = pad_targets(targets, "cpu")
    if pred_boxes is None:
        pred_boxes = torch.cat([POINTS, POINTS], 1)  # empty boxes at the points: IoU 0 with everything
    logits = torch.zeros(1, len(POINTS), classes)
    return assign(logits, pred_boxes[None], POINTS, STRIDES, boxes, labels, valid)


def test_points_in_the_center_region_are_positive_and_far_points_negative():
    box = [8.0, 8.0, 40.0, 40.0]  # centre (24, 24); center region: |d| < 1.5 * 8 = 12 -> points at 20 and 28
    pred = torch.tensor(box).expand(len(POINTS), 4).clone()  # every prediction is the box: IoU 1
    result = run([box], [2], pred)
    inside = {point_index(x, y) for x in (20.0, 28.0) for y in (20.0, 28.0)}
    positives = set(result.positive[0].nonzero().flatten().tolist())
    assert positives == inside  # k = int(sum of the 4 candidates' IoUs) = 4: all of them
    assert result.labels[0, sorted(inside)].tolist() == [2, 2, 2, 2]
    assert torch.equal(result.boxes[0, point_index(20.0, 28.0)], torch.tensor(box))
    far = point_index(60.0, 60.0)
    assert not result.positive[0, far] and result.gt_index[0, far] == -1
    # inside the box but outside its center region: not a candidate
    assert not result.positive[0, point_index(12.0, 12.0)]


def test_dynamic_k_follows_the_predicted_ious():
    box = [8.0, 8.0, 40.0, 40.0]
    result = run([box], [0])  # predictions overlap nothing: sum of IoUs 0, k clamped to 1
    assert int(result.positive.sum()) == 1


def test_a_point_claimed_by_two_boxes_goes_to_the_cheaper_one():
    a = [17.0, 17.0, 24.0, 24.0]  # one candidate only: the point (20, 20)
    b = [8.0, 8.0, 40.0, 40.0]  # candidates (20|28, 20|28)
    shared = point_index(20.0, 20.0)
    pred = torch.cat([POINTS, POINTS], 1)
    pred[shared] = torch.tensor(b)  # the shared point predicts b exactly: cost 0 for b, > 0 for a
    result = run([a, b], [0, 1], pred)
    assert result.positive[0, shared]
    assert result.gt_index[0, shared] == 1 and result.labels[0, shared] == 1
    assert not (result.gt_index[0] == 0).any()  # a lost its only point


def test_images_without_boxes_are_all_background_in_a_batch():
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
               {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    boxes, labels, valid = pad_targets(targets, "cpu")
    assert valid.tolist() == [[False], [True]]
    pred = torch.cat([POINTS, POINTS], 1).expand(2, -1, -1)
    result = assign(torch.zeros(2, len(POINTS), 3), pred, POINTS, STRIDES, boxes, labels, valid)
    assert not result.positive[0].any() and (result.gt_index[0] == -1).all()
    assert result.positive[1].sum() == 1
    empty = pad_targets(targets[:1], "cpu")
    only_empty = assign(torch.zeros(1, len(POINTS), 3), pred[:1], POINTS, STRIDES, *empty)
    assert not only_empty.positive.any()


def test_points_are_cell_centres_level_by_level():
    points, strides = level_points([(2, 2), (1, 1)], [8, 16], "cpu")
    assert points.tolist() == [[4, 4], [12, 4], [4, 12], [12, 12], [8, 8]]
    assert strides.tolist() == [8, 8, 8, 8, 16]
