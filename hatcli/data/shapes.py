"""The built-in synthetic dataset: coloured shapes on textured backgrounds, as real JPEG files.

`generate_shapes` writes an ImageNet-style folder tree (classification), a COCO-style image
folder plus annotation json (detection), or image and mask folders (segmentation: each pixel's
class, 0 the background); `pack_shapes` (`hat pack shapes`) generates it and packs it with the
`imagenet` or `coco` packer, or as segmentation records. Everything is deterministic for a seed: each image draws from its own
random generator seeded with (seed, split, index).
"""

from __future__ import annotations

import functools
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from hatcli.data.masks import encode_mask
from hatcli.data.packers.coco import pack_coco_split
from hatcli.data.packers.imagenet import pack_imagenet_split
from hatcli.data.packers.mask_folders import pack_mask_folders
from hatcli.data.palette import voc_colormap
from hatcli.data.packing import add_summary
from hatcli.errors import UsageError
from hatcli.family import PackRequest, PackResult
from hatcli.locking import exclusive, lock_file_for
from hatcli.progress import track

CLASSES = ("circle", "cross", "ring", "square", "star", "triangle")
"""Shape classes, in label order (sorted, so the folder packer gives the same labels)."""
SEGMENTATION_CLASSES = ("background", *CLASSES)
"""Segmentation classes: a mask holds 0 for the background and 1 + the shape's class elsewhere."""
MASK_COVERAGE = 0.5
"""A pixel belongs to a shape in the mask when the shape covers at least this share of it."""

DEFAULT_NUM_IMAGES = 1200
VAL_FRACTION = 0.2
JPEG_QUALITY = 90
_SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: anti-aliased edges
_SPLIT_IDS = {"train": 0, "val": 1}


def split_sizes(num_images: int) -> dict[str, int]:
    """Return how many of `num_images` go to train and val (val is 20%, at least one)."""
    if num_images < 2:
        raise UsageError(f"num_images must be at least 2 (one train and one val image), got {num_images}")
    n_val = max(1, int(num_images * VAL_FRACTION))
    return {"train": num_images - n_val, "val": n_val}


# -- drawing ---------------------------------------------------------------------------------


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius `r` centred on (cx, cy), rotated by `angle`."""
    if kind == "triangle":
        local = [(math.cos(a), math.sin(a)) for a in (np.arange(3) * 2 * math.pi / 3 - math.pi / 2)]
    elif kind == "square":
        s = 1 / math.sqrt(2)
        local = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif kind == "star":
        local = []
        for i in range(10):
            rad = 1.0 if i % 2 == 0 else 0.45
            a = i * math.pi / 5 - math.pi / 2
            local.append((rad * math.cos(a), rad * math.sin(a)))
    elif kind == "cross":
        t = 0.33  # half width of an arm, as a fraction of r
        e = 1 / math.sqrt(1 + t * t)  # keeps the arm ends' corners on the circumcircle
        a, b = t * e, e
        local = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
                 (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    else:
        raise ValueError(kind)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in local]


def _shape_outline(kind: str, size: int, cx: float, cy: float, r: float, angle: float) -> tuple[list[tuple[float, float]] | None, list[float]]:
    """Return the polygon of a shape (None for round ones) and its tight xywh box, clipped to the image."""
    if kind in ("circle", "ring"):
        pts = None
        x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
    else:
        pts = _polygon(kind, cx, cy, r, angle)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    x0, y0 = max(0.0, x0), max(0.0, y0)
    x1, y1 = min(float(size), x1), min(float(size), y1)
    return pts, [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def _shape_alpha(
    kind: str, pts: list[tuple[float, float]] | None, box: list[float], cx: float, cy: float, r: float, size: int
) -> tuple[np.ndarray, int, int]:
    """Anti-aliased alpha (float32 0..1) of a shape over the pixels its box touches, and that patch's corner."""
    S = _SUPERSAMPLE
    px0, py0 = int(box[0]), int(box[1])
    px1, py1 = min(size, math.ceil(box[0] + box[2])), min(size, math.ceil(box[1] + box[3]))
    w, h = max(px1 - px0, 1), max(py1 - py0, 1)
    mask = Image.new("L", (w * S, h * S), 0)
    draw = ImageDraw.Draw(mask)
    if pts is None:
        def ellipse(rad: float, fill: int) -> None:
            draw.ellipse([(cx - rad - px0) * S, (cy - rad - py0) * S,
                          (cx + rad - px0) * S - 1, (cy + rad - py0) * S - 1], fill=fill)
        ellipse(r, 255)
        if kind == "ring":
            ellipse(0.55 * r, 0)
    else:
        draw.polygon([((x - px0) * S, (y - py0) * S) for x, y in pts], fill=255)
    alpha = np.asarray(mask.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / np.float32(255.0)
    return alpha, px0, py0


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (y, x) pixel coordinates in 0..1, float32 HxW each."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(max(size - 1, 1))
    return yy, xx


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth two-colour gradient with faint stripes, float32 HxWx3 in 0..255."""
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = _grid(size)
    t = xx * np.float32(math.cos(theta)) + yy * np.float32(math.sin(theta))
    t -= t.min()
    t /= max(float(t.max()), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    if rng.random() < 0.6:  # stripes
        phi = rng.uniform(0, 2 * math.pi)
        freq = rng.uniform(3, 10) * 2 * math.pi
        phase = xx * np.float32(freq * math.cos(phi)) + yy * np.float32(freq * math.sin(phi))
        stripes = np.sin(phase + np.float32(rng.uniform(0, 2 * math.pi)))
        img += np.float32(rng.uniform(8, 25)) * stripes[..., None]
    return img


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A saturated colour whose luma differs clearly from the background's mean luma."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    bg_luma = float(background.reshape(-1, 3).mean(0) @ weights)
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    for _ in range(20):
        if abs(float(colour @ weights) - bg_luma) >= 70:
            break
        colour = rng.uniform(0, 255, 3).astype(np.float32)
    else:  # fall back to the far end of the luma range
        colour = np.full(3, 245.0 if bg_luma < 128 else 10.0, dtype=np.float32)
    return colour


def _overlap(a: list[float], b: list[float]) -> float:
    """Intersection area over the smaller box's area, for xywh boxes."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / max(min(a[2] * a[3], b[2] * b[3]), 1e-6)


def render_image(
    seed: int, split: str, index: int, image_size: int, task: str
) -> tuple[bytes, list[dict[str, Any]], np.ndarray]:
    """Render one image; return its JPEG bytes, its objects (`label`, `box` xywh, `area`) and its
    label mask (uint8 HxW: 0 background, 1 + class where a shape covers `MASK_COVERAGE` of a pixel;
    a later shape paints over an earlier one, as in the image).

    Classification images hold one large shape whose class is ``index % len(CLASSES)``;
    detection and segmentation images hold 1-4 smaller shapes that overlap little.
    """
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    size = image_size
    img = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    if task == "classification":
        wanted = [index % len(CLASSES)]
        r_range = (0.25 * size, 0.42 * size)
    else:
        wanted = list(rng.integers(0, len(CLASSES), int(rng.integers(1, 5))))
        r_range = (0.09 * size, 0.2 * size)
    objects: list[dict[str, Any]] = []
    for label in wanted:
        kind = CLASSES[label]
        for _attempt in range(15):
            r = float(rng.uniform(*r_range))
            cx = float(rng.uniform(r, size - r))
            cy = float(rng.uniform(r, size - r))
            angle = float(rng.uniform(0, 2 * math.pi))
            pts, box = _shape_outline(kind, size, cx, cy, r, angle)
            if all(_overlap(box, o["box"]) < 0.15 for o in objects):
                break
        else:
            continue  # no room left: draw fewer shapes
        alpha, px0, py0 = _shape_alpha(kind, pts, box, cx, cy, r, size)
        h, w = alpha.shape
        patch = img[py0:py0 + h, px0:px0 + w]
        colour = _contrasting_colour(rng, patch)
        shade = np.float32(1.0) + np.float32(0.25 * rng.uniform(-1, 1)) * np.linspace(-1, 1, h, dtype=np.float32)
        a = alpha[..., None]
        patch *= 1 - a
        patch += (colour[None, None, :] * shade[:, None, None]) * a
        mask[py0:py0 + h, px0:px0 + w][alpha >= MASK_COVERAGE] = label + 1
        objects.append({"label": int(label), "box": box, "area": round(float(alpha.sum()), 2)})
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 9))
    pixels = np.clip(img, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), objects, mask


def generate_shapes(root: Path, task: str, num_images: int, seed: int, image_size: int) -> dict[str, int]:
    """Write the raw shapes dataset under `root/raw`; return the image count per split.

    Classification: ``raw/{train,val}/<class>/<00000>.jpg`` (every class folder exists, even an
    empty one). Detection: ``raw/{train2017,val2017}/<image_id:012d>.jpg`` and
    ``raw/annotations/instances_{train,val}2017.json``. Segmentation: ``raw/segmentation/{train,val}/
    images/<00000>.jpg`` and ``.../masks/<00000>.png`` (8-bit class indices). Earlier output there is
    replaced.
    """
    if task not in ("classification", "detection", "segmentation"):
        raise UsageError(f"unknown task `{task}` for the shapes dataset: use classification, detection or "
                         "segmentation")
    if image_size < 16:
        raise UsageError(f"image_size must be at least 16 pixels, got {image_size}")
    sizes = split_sizes(num_images)
    raw = Path(root) / "raw"
    next_image_id = 1
    for split, n in sizes.items():
        if task == "classification":
            split_dir = raw / split
            shutil.rmtree(split_dir, ignore_errors=True)
            for name in CLASSES:
                (split_dir / name).mkdir(parents=True, exist_ok=True)
        elif task == "segmentation":
            split_dir = raw / "segmentation" / split
            shutil.rmtree(split_dir, ignore_errors=True)
            (split_dir / "images").mkdir(parents=True)
            (split_dir / "masks").mkdir(parents=True)
        else:
            split_dir = raw / f"{split}2017"
            shutil.rmtree(split_dir, ignore_errors=True)
            split_dir.mkdir(parents=True)
            images: list[dict[str, Any]] = []
            annotations: list[dict[str, Any]] = []
        for index in track(range(n), total=n, description=f"generate shapes {split}"):
            data, objects, mask = render_image(seed, split, index, image_size, task)
            if task == "classification":
                (split_dir / CLASSES[objects[0]["label"]] / f"{index:05d}.jpg").write_bytes(data)
                continue
            if task == "segmentation":
                (split_dir / "images" / f"{index:05d}.jpg").write_bytes(data)
                (split_dir / "masks" / f"{index:05d}.png").write_bytes(encode_mask(mask))
                continue
            image_id = next_image_id
            next_image_id += 1
            file_name = f"{image_id:012d}.jpg"
            (split_dir / file_name).write_bytes(data)
            images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
            for obj in objects:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": obj["label"] + 1,
                    "bbox": obj["box"], "area": obj["area"], "iscrowd": 0,
                })
        if task == "detection":
            coco = {
                "info": {"description": "hat shapes: synthetic coloured shapes", "version": "1.0"},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)],
            }
            ann_dir = raw / "annotations"
            ann_dir.mkdir(parents=True, exist_ok=True)
            tmp = ann_dir / f"instances_{split}2017.json.tmp"
            tmp.write_text(json.dumps(coco))
            tmp.replace(ann_dir / f"instances_{split}2017.json")
    return sizes


# -- packing ---------------------------------------------------------------------------------


def pack_shapes(request: PackRequest) -> PackResult:
    """Generate the shapes dataset into `request.target_data_dir` and pack it (`hat pack shapes`).

    Writes ``raw/`` plus ``train_lmdb`` and ``val_lmdb`` (or only the one named by
    `request.split` when it is ``train`` or ``val``).
    """
    if request.split not in ("all", "train", "val"):
        raise UsageError(f"unknown split `{request.split}` for shapes: use all, train or val")
    num_images = DEFAULT_NUM_IMAGES if request.num_images is None else request.num_images
    root = Path(request.target_data_dir)
    with exclusive(lock_file_for(root / "raw"), root / "raw"):  # one generator of raw/ at a time
        generate_shapes(root, request.task, num_images, request.seed, request.image_size)
        extra = {"source": "shapes", "seed": request.seed, "image_size": request.image_size}
        splits = ["train", "val"] if request.split == "all" else [request.split]
        result = PackResult(notes=[f"raw images in {root / 'raw'}"])
        for split in splits:
            if request.task == "classification":
                summary, _ignored = pack_imagenet_split(root / "raw", root, split, workers=request.workers,
                                                        strict=request.strict, extra_meta=extra, request=request)
            elif request.task == "segmentation":
                split_dir = root / "raw" / "segmentation" / split
                summary = pack_mask_folders(
                    split_dir / "images", split_dir / "masks", root, split, list(SEGMENTATION_CLASSES),
                    palette=voc_colormap(len(SEGMENTATION_CLASSES)), source="shapes", extra_meta=extra,
                    request=request,
                )
            else:
                summary = pack_coco_split(
                    root / "raw" / "annotations" / f"instances_{split}2017.json", root / "raw" / f"{split}2017",
                    root, split, workers=request.workers, strict=request.strict, extra_meta=extra, request=request,
                )
            add_summary(result, summary)
    return result
