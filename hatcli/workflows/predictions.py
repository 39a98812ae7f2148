"""Predictions drawn on pictures: one image through a stage's model, the classes, boxes or
per-pixel classes it found, and the picture with them drawn by the family (what `hat infer` writes and what the run
report shows for a few validation images)."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from hatcli.recipe import LoadedRecipe


@dataclass
class Picture:
    """One encoded image, decoded twice: as PIL draws on it and as the model is fed it."""

    image: Image.Image
    tensor: Any
    """uint8 CHW RGB tensor (`torchvision.io.decode_image`)."""


def read_picture(data: bytes) -> Picture:
    """Decode JPEG/PNG bytes; PIL's and torchvision's errors (UnidentifiedImageError, RuntimeError,
    OSError) are the caller's to word."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    image = Image.open(io.BytesIO(data))
    image.load()
    tensor = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return Picture(image, tensor)


def predict_picture(lr: LoadedRecipe, model: Callable, classes: list[str], picture: Picture,
                    topk: int | None = None, min_score: float = 0.3) -> tuple[list[dict[str, Any]], Image.Image]:
    """Run `picture` through `model` (a `stage_model` callable) and draw what it found: the top-k
    classes (default 5) for classification, boxes scoring at least `min_score` (at most `topk`,
    default 100) in the picture's own pixels for detection, a class per pixel for segmentation.
    Returns (rows, drawn picture); a row is `{"label", "score"}`, plus `"box"` (x1, y1, x2, y2) for
    detection; for segmentation one row per class present, largest first, with its `share` of the
    picture's pixels and `score` its pixels' mean confidence."""
    if lr.family.task == "detection":
        return _detect(lr, model, picture, classes, topk or 100, min_score)
    if lr.family.task == "segmentation":
        return _segment(lr, model, picture, classes)
    return _classify(lr, model, picture, classes, topk or 5)


def _classify(lr: LoadedRecipe, model: Callable, picture: Picture, classes: list[str],
              topk: int) -> tuple[list[dict[str, Any]], Image.Image]:
    """Top-k classes of one image, and the picture with them drawn."""
    import torch

    from hatcli.inputs import model_input
    from hatcli.tasks.drawing import class_name

    with torch.no_grad():
        outputs = model(model_input(lr, picture.tensor))
    prediction = lr.family.predict(outputs, topk=topk, config=lr.model)[0]
    rows = [{"label": class_name(classes, l), "score": s} for l, s in zip(prediction.labels, prediction.scores)]
    return rows, lr.family.draw_predictions(picture.image, prediction, classes)


def _detect(lr: LoadedRecipe, model: Callable, picture: Picture, classes: list[str], topk: int,
            min_score: float) -> tuple[list[dict[str, Any]], Image.Image]:
    """Detections of one image in its own pixels, and the picture with the boxes drawn."""
    import torch

    from hatcli.inputs import detection_model_input
    from hatcli.tasks.detection import to_original
    from hatcli.tasks.drawing import class_name

    inputs, target = detection_model_input(lr, picture.tensor)
    with torch.no_grad():
        outputs = model(inputs)
    found = to_original(lr.family.predict(outputs, topk=topk, config=lr.model)[0], target)
    keep = found.scores >= min_score
    rows = [{"label": class_name(classes, int(l)), "score": float(s), "box": [round(float(v), 2) for v in b]}
            for b, s, l in zip(found.boxes[keep], found.scores[keep], found.labels[keep])]
    return rows, lr.family.draw_predictions(picture.image, found, classes, min_score=min_score)


def _segment(lr: LoadedRecipe, model: Callable, picture: Picture,
             classes: list[str]) -> tuple[list[dict[str, Any]], Image.Image]:
    """Every pixel's class in the picture's own pixels, and the picture with the coloured mask and
    a legend drawn (the class colours of the val data's `palette` when it has one)."""
    import torch

    from hatcli.inputs import detection_model_input
    from hatcli.tasks.drawing import class_name
    from hatcli.tasks.segmentation import to_original

    inputs, target = detection_model_input(lr, picture.tensor)
    with torch.no_grad():
        outputs = model(inputs)
    found = to_original(lr.family.predict(outputs, config=lr.model)[0], target)
    rows = []
    for label, share in found.class_shares():
        confidence = found.confidence[found.labels == label].mean()
        rows.append({"label": class_name(classes, label), "share": share, "score": float(confidence)})
    return rows, lr.family.draw_predictions(picture.image, found, classes, palette=data_palette(lr))


def data_palette(lr: LoadedRecipe) -> list[tuple[int, int, int]] | None:
    """The class colours recorded in the recipe's packed val (or train) data, None when it has none."""
    from hatcli.data.lmdb_format import open_packed
    from hatcli.errors import DataError
    from hatcli.inputs import data_path

    for split in ("val", "train"):
        try:
            palette = open_packed(data_path(lr, split)).meta.get("palette")
        except DataError:
            continue
        if palette:
            return [tuple(int(v) for v in colour) for colour in palette]  # type: ignore[misc]
    return None
