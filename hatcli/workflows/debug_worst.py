"""The images on which the pair of stages disagree most, each drawn with every stage's prediction.

Images are ranked by whether the pair predicts differently (another top-1 class, other
detections), then by how much the pair's outputs differ on that image, most first. Each one is
drawn once per stage by the family (`hatcli.workflows.predictions`, what `hat infer` draws), the
pictures side by side with the stage named above each, and saved as a JPEG in the debug folder.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from hatcli.atomic import atomic_write_bytes
from hatcli.data.lmdb_format import open_packed
from hatcli.inputs import data_path
from hatcli.recipe import LoadedRecipe
from hatcli.workflows.debug_measure import ImageRecord
from hatcli.workflows.debug_metrics import rounded
from hatcli.workflows.predictions import predict_picture, read_picture

PANEL_HEIGHT = 240
"""Height of each stage's picture in a drawing, in pixels."""
CAPTION_HEIGHT = 18
PREFIX = "worst-"
MIN_SCORE = 0.3
"""Detections drawn and counted from this score up (what `hat infer` draws by default)."""


def rank_images(records: list[ImageRecord], count: int) -> list[ImageRecord]:
    """The `count` images of most disagreement: differing predictions first, then the largest
    difference of the outputs."""
    return sorted(records, key=lambda r: (r.same, -r.difference, r.index))[:count]


def _summary(rows: list[dict[str, Any]], detection: bool) -> str:
    """One stage's prediction on one image in a few words."""
    if detection:
        return f"{len(rows)} box(es) >= {MIN_SCORE:g}" + (f", best {rows[0]['label']} {rows[0]['score']:.2f}"
                                                         if rows else "")
    if rows and "share" in rows[0]:  # segmentation: the classes covering most of the picture
        return ", ".join(f"{r['label']} {100 * r['share']:.0f} %" for r in rows[:3])
    return f"{rows[0]['label']} {100 * rows[0]['score']:.1f} %" if rows else "nothing"


def _panel(picture: Image.Image, caption: str) -> Image.Image:
    scaled = picture.convert("RGB")
    scaled = scaled.resize((max(1, round(scaled.width * PANEL_HEIGHT / scaled.height)), PANEL_HEIGHT))
    panel = Image.new("RGB", (scaled.width, PANEL_HEIGHT + CAPTION_HEIGHT), "white")
    panel.paste(scaled, (0, CAPTION_HEIGHT))
    ImageDraw.Draw(panel).text((4, 3), caption, fill="black")
    return panel


def side_by_side(panels: list[Image.Image]) -> Image.Image:
    """Pictures of equal height in one row, 4 pixels apart."""
    width = sum(p.width for p in panels) + 4 * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + 4
    return canvas


def draw_worst(lr: LoadedRecipe, models: dict[str, Any], classes: list[str], records: list[ImageRecord],
               folder: Path) -> list[dict[str, Any]]:
    """Draw each image of `records` with every stage's prediction (`models`: stage -> callable)
    into `folder/worst-<rank>.jpg`; one row per image, most disagreement first."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{PREFIX}*.jpg"):
        old.unlink()
    reader = open_packed(data_path(lr, "val"))
    detection = lr.family.task == "detection"
    rows = []
    for rank, record in enumerate(records, start=1):
        item = reader[record.index]
        picture = read_picture(item["image"])
        row: dict[str, Any] = {"rank": rank, "index": record.index,
                               "file": str(item.get("name") or item.get("file_name") or record.index),
                               "sqnr_db": rounded(record.sqnr_db, 2), "difference_rms": rounded(record.difference, 6),
                               "same_prediction": record.same}
        if not detection and "label" in item:
            row["truth"] = classes[item["label"]] if item["label"] < len(classes) else str(item["label"])
        panels = []
        for stage, model in models.items():
            found, drawn = predict_picture(lr, model, classes, picture, topk=3 if not detection else None,
                                           min_score=MIN_SCORE)
            row[stage] = _summary(found, detection)
            panels.append(_panel(drawn, f"{stage}: {row[stage]}"))
        name = f"{PREFIX}{rank}.jpg"
        buffer = io.BytesIO()
        side_by_side(panels).save(buffer, format="JPEG", quality=85)
        atomic_write_bytes(folder / name, buffer.getvalue())
        row["image"] = name
        rows.append(row)
    return rows
