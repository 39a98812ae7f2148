"""What the prediction pictures of every task share: a canvas large enough to read, class names."""

from __future__ import annotations

from PIL import Image

MIN_WIDTH = 320
"""Pictures narrower than this are enlarged so that their labels stay readable."""


def readable_canvas(image: Image.Image, resample: Image.Resampling) -> tuple[Image.Image, float]:
    """An RGB copy of `image` enlarged to at least `MIN_WIDTH` pixels wide with `resample`, and
    the factor its coordinates were scaled by (1.0 when it was wide enough)."""
    canvas = image.convert("RGB")
    if canvas.width >= MIN_WIDTH:
        return canvas, 1.0
    factor = MIN_WIDTH / canvas.width
    return canvas.resize((MIN_WIDTH, round(canvas.height * factor)), resample), factor


def class_name(class_names: list[str], index: int) -> str:
    """The name of class `index`, or the index itself where the names stop short."""
    return class_names[index] if index < len(class_names) else str(index)
