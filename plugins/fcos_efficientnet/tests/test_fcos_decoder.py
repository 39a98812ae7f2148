"""Decoding hand-made head maps: score threshold, class-aware NMS, top-k, clipping."""

from __future__ import annotations

import torch

from hat_fcos_efficientnet.family import FcosEfficientNetConfig, FcosEfficientNetFamily

FAMILY = FcosEfficientNetFamily()
SIZE, CLASSES = 64, 2


def maps() -> tuple[torch.Tensor, ...]:
    """Five levels for a 64 x 64 input: background everywhere but a few stride-8 points."""
    shapes = [8, 4, 2, 1, 1]
    cls = [torch.full((1, CLASSES, n, n), -10.0) for n in shapes]
    bbox = [torch.zeros(1, 4, n, n) for n in shapes]
    ctr = [torch.full((1, 1, n, n), 10.0) for n in shapes]  # centerness ~1: scores ~ sqrt(p)

    def put(row: int, col: int, label: int, logit: float, ltrb: list[float]) -> None:
        cls[0][0, label, row, col] = logit
        bbox[0][0, :, row, col] = torch.tensor(ltrb)

    put(1, 1, 0, 3.0, [1, 1, 1, 1])  # point (12, 12): box (4, 4, 20, 20)
    put(1, 2, 0, 2.0, [2, 1, 0, 1])  # point (20, 12): the same box, same class, lower score -> NMS
    cls[0][0, 1, 1, 2] = 1.0  # ... and class 1 there: class-aware NMS keeps it
    put(5, 5, 1, -5.5, [1, 1, 1, 1])  # sqrt(sigmoid(-5.5)) = 0.064: above 0.05
    put(3, 5, 1, -6.0, [1, 1, 1, 1])  # sqrt(sigmoid(-6)) = 0.0497: below 0.05
    put(7, 7, 0, 0.0, [0, 0, 2, 2])  # point (60, 60): box (60, 60, 76, 76), clipped to the image
    return (*cls, *bbox, *ctr)


def config(**extra) -> FcosEfficientNetConfig:
    """The family's config with decoder overrides."""
    return FcosEfficientNetConfig(name=FAMILY.name, **extra)


def test_threshold_nms_and_clipping():
    (det,) = FAMILY.predict(maps(), config=config())
    assert det.labels.tolist() == [0, 1, 0, 1]
    expected = torch.sigmoid(torch.tensor([3.0, 1.0, 0.0, -5.5])) * torch.sigmoid(torch.tensor(10.0))
    assert torch.allclose(det.scores, expected.sqrt())
    assert det.boxes[0].tolist() == [4, 4, 20, 20] and det.boxes[1].tolist() == [4, 4, 20, 20]
    assert det.boxes[2].tolist() == [60, 60, 64, 64]
    assert det.boxes[3].tolist() == [36, 36, 52, 52]


def test_max_per_image_keeps_the_best_and_topk_caps_it():
    (det,) = FAMILY.predict(maps(), config=config(max_per_img=2))
    assert det.labels.tolist() == [0, 1] and len(det) == 2
    (det,) = FAMILY.predict(maps(), topk=1, config=config())
    assert len(det) == 1 and det.labels.tolist() == [0]


def test_nms_pre_limits_the_candidates_and_the_score_can_be_the_plain_product():
    (det,) = FAMILY.predict(maps(), config=config(nms_pre=2))
    assert det.labels.tolist() == [0]  # the two best candidates are the duplicates of one box
    (det,) = FAMILY.predict(maps(), config=config(score_sqrt=False, score_threshold=0.3))
    product = torch.sigmoid(torch.tensor([3.0, 1.0, 0.0])) * torch.sigmoid(torch.tensor(10.0))
    assert torch.allclose(det.scores, product)


def test_a_batch_is_decoded_image_by_image():
    single = maps()
    empty = tuple(torch.full_like(m, -10.0) if i < 5 else m for i, m in enumerate(single))
    batch = tuple(torch.cat([a, b]) for a, b in zip(single, empty))
    first, second = FAMILY.predict(batch, config=config())
    assert len(first) == 4 and len(second) == 0
