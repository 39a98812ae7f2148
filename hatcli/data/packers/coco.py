"""`hat pack coco`: COCO-format detection data (COCO 2017, or any dataset in its json format).

Source layout: ``SRC/annotations/instances_<split>2017.json`` (or ``--ann-file``) and the images
in ``SRC/<split>2017/`` (or ``SRC/<split>/``), where each image's ``file_name`` is looked up.

Nothing is hard-coded about the categories: labels are contiguous in sorted category-id order,
the original ids are kept per box (``category_ids``) and in the metadata (``category_ids``,
``coco_categories``), so custom COCO-format datasets pack the same way. Each record keeps what
COCOeval needs to score against the original ground truth: image id, file name, size, boxes
(xywh pixels), category ids, iscrowd, area and the annotation ids.

Checked while listing (each problem rejects the annotation or the image, reported with the
annotation file, the record and the reason): duplicate image or annotation ids, a ``file_name``
that is absolute or leaves the image folder, an annotation for an image id that is not listed,
an unknown category, a box with non-positive size or outside its image (by more than
`BOX_TOLERANCE` pixels). Checked while reading: an image file that is missing, unreadable,
undecodable, or whose size differs from the json.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from hatcli.data.packing import (
    Outcome,
    PackSummary,
    check_image,
    db_path,
    file_signature,
    fingerprint,
    read_file,
    rejection,
    add_summary,
    run_pack,
)
from hatcli.errors import DataError, UsageError
from hatcli.family import PackRequest, PackResult

BOX_TOLERANCE = 1.0
"""Pixels a box may stick out of its image (COCO boxes are floats rounded to 2 decimals)."""
FORMAT_REVISION = 1

Annotation = tuple[list[float], int, int, int, float, int]  # bbox, label, category id, iscrowd, area, ann id
Item = tuple[str, dict[str, Any], list[Annotation]]


def default_paths(src: Path | None, split: str, ann_file: Path | None) -> tuple[Path, Path]:
    """The annotation file and image folder of `split` under `src` (the COCO 2017 layout)."""
    if src is None:
        raise UsageError("`hat pack coco` needs --src-data-dir (the folder with annotations/ and the images)")
    src = Path(src)
    ann = Path(ann_file) if ann_file is not None else src / "annotations" / f"instances_{split}2017.json"
    if not ann.is_file():
        raise UsageError(f"no annotation file {ann}; pass --ann-file for a custom layout")
    for candidate in (src / f"{split}2017", src / split):
        if candidate.is_dir():
            return ann, candidate
    raise UsageError(f"no image folder {src / f'{split}2017'} or {src / split}")


def _load(ann_file: Path) -> dict[str, Any]:
    try:
        coco = json.loads(ann_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read COCO annotations {ann_file}: {exc}") from None
    if not isinstance(coco, dict):
        raise DataError(f"{ann_file} is not a COCO instances file: the top level is not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{ann_file} is not a COCO instances file: it has no `{key}` list")
    return coco


def _categories(coco: dict[str, Any], ann_file: Path) -> list[dict[str, Any]]:
    seen: set[int] = set()
    categories = []
    for i, cat in enumerate(coco["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise DataError(f"{ann_file}: categories[{i}] needs an integer `id` and a `name`")
        if cat["id"] in seen:
            raise DataError(f"{ann_file}: category id {cat['id']} appears twice; category ids must be unique")
        seen.add(cat["id"])
        categories.append({"id": int(cat["id"]), "name": str(cat["name"]),
                           "supercategory": str(cat.get("supercategory", ""))})
    if not categories:
        raise DataError(f"{ann_file} lists no categories")
    return sorted(categories, key=lambda c: c["id"])


def _safe_file(image_dir: Path, file_name: Any) -> Path | None:
    """The image's path inside `image_dir`, or None when `file_name` would leave that folder."""
    if not isinstance(file_name, str) or not file_name:
        return None
    pure = PurePosixPath(file_name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        return None
    return image_dir.joinpath(*pure.parts)


def _box_problem(bbox: Any, width: int, height: int) -> str | None:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        return f"bbox must be [x, y, width, height], got {bbox!r}"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"box {bbox} has non-positive size"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"box {bbox} lies outside its {width}x{height} image"
    return None


def list_coco(ann_file: Path, image_dir: Path) -> tuple[list[dict[str, Any]], list[Item], list[dict[str, Any]]]:
    """Read and check the annotation file: categories, items in image-id order, listing rejections."""
    coco = _load(ann_file)
    categories = _categories(coco, ann_file)
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    rejected: list[dict[str, Any]] = []
    images: dict[int, dict[str, Any]] = {}
    for i, im in enumerate(coco["images"]):
        where = f"{ann_file}#images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("id"), int):
            rejected.append(rejection(where, "image entry needs an integer `id`"))
            continue
        if im["id"] in images:
            rejected.append(rejection(where, f"duplicate image id {im['id']} (first used by "
                                             f"{images[im['id']]['file_name']}); the later entry is skipped",
                                      image_id=im["id"]))
            continue
        path = _safe_file(image_dir, im.get("file_name"))
        if path is None:
            rejected.append(rejection(where, f"file_name {im.get('file_name')!r} is not a relative path inside "
                                             f"{image_dir}", image_id=im["id"]))
            continue
        if not all(isinstance(im.get(k), int) and im[k] > 0 for k in ("height", "width")):
            rejected.append(rejection(where, "image entry needs positive integer `height` and `width`",
                                      image_id=im["id"]))
            continue
        images[im["id"]] = {"id": im["id"], "file_name": im["file_name"], "height": im["height"],
                            "width": im["width"], "path": str(path)}
    anns: dict[int, list[Annotation]] = {image_id: [] for image_id in images}
    ann_ids: set[Any] = set()
    for i, ann in enumerate(coco["annotations"]):
        where = f"{ann_file}#annotations[{i}]"
        if not isinstance(ann, dict):
            rejected.append(rejection(where, "annotation is not an object"))
            continue
        ann_id = ann.get("id")
        if ann_id is not None and ann_id in ann_ids:
            rejected.append(rejection(where, f"duplicate annotation id {ann_id}; the later one is skipped",
                                      ann_id=ann_id))
            continue
        ann_ids.add(ann_id)
        image = images.get(ann.get("image_id"))  # type: ignore[arg-type]
        if image is None:
            rejected.append(rejection(where, f"annotation refers to image id {ann.get('image_id')!r}, "
                                             f"which is not among the usable images", ann_id=ann_id))
            continue
        if ann.get("category_id") not in label_of:
            rejected.append(rejection(where, f"unknown category id {ann.get('category_id')!r}", ann_id=ann_id))
            continue
        problem = _box_problem(ann.get("bbox"), image["width"], image["height"])
        if problem is not None:
            rejected.append(rejection(where, f"{problem} ({image['file_name']})", ann_id=ann_id))
            continue
        bbox = [float(v) for v in ann["bbox"]]
        area = float(ann.get("area", bbox[2] * bbox[3]))
        anns[image["id"]].append((bbox, label_of[ann["category_id"]], int(ann["category_id"]),
                                  int(bool(ann.get("iscrowd", 0))), area, int(ann_id) if isinstance(ann_id, int) else -1))
    items: list[Item] = [(images[i]["path"], images[i], anns[i]) for i in sorted(images)]
    return categories, items, rejected


def read_item(item: Item) -> Outcome:
    """Read and validate one image and attach its annotations (runs in the pack workers)."""
    path, image, anns = item
    data, reason = read_file(path)
    size = None
    if data is not None:
        reason, size = check_image(data)
    if reason is None and size != (image["height"], image["width"]):
        reason = (f"the image is {size[1]}x{size[0]} (WxH) but the annotation file says "  # type: ignore[index]
                  f"{image['width']}x{image['height']}")
    if reason is not None:
        return Outcome(None, [rejection(path, reason, image_id=image["id"])])
    return Outcome({
        "image": data,
        "image_id": int(image["id"]),
        "file_name": str(image["file_name"]),
        "height": int(image["height"]),
        "width": int(image["width"]),
        "boxes": [a[0] for a in anns],
        "labels": [a[1] for a in anns],
        "category_ids": [a[2] for a in anns],
        "iscrowd": [a[3] for a in anns],
        "area": [a[4] for a in anns],
        "ann_ids": [a[5] for a in anns],
    })


def pack_coco_split(
    ann_file: Path, image_dir: Path, target_data_dir: Path, split: str, *, workers: int = 0,
    strict: bool = False, extra_meta: dict[str, Any] | None = None, on_item: Any = None,
) -> PackSummary:
    """Pack one COCO-format split into ``target/<split>_lmdb``."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    categories, items, listing_rejections = list_coco(ann_file, image_dir)
    signatures = [[item[1]["file_name"], *file_signature(Path(item[0]))] for item in items]
    digest = fingerprint("coco", FORMAT_REVISION, split, file_signature(ann_file), signatures, extra_meta)
    meta = {
        "source": "coco",
        "ann_file": ann_file.name,
        "category_ids": [c["id"] for c in categories],
        "coco_categories": categories,
        **(extra_meta or {}),
    }
    return run_pack(
        db=db_path(target_data_dir, split), kind="detection", split=split,
        classes=[c["name"] for c in categories], items=items, read=read_item, source_fingerprint=digest,
        workers=workers, strict=strict, listing_rejections=listing_rejections, extra_meta=meta,
        description=f"pack {split}", on_item=on_item,
    )



def run(request: PackRequest) -> PackResult:
    """`hat pack coco`: pack the requested split(s); ``all`` packs every split with an annotation file."""
    if request.split == "all":
        if request.ann_file is not None:
            raise UsageError("--ann-file names one split's annotations: give --split too")
        ann_dir = Path(request.src_data_dir or ".") / "annotations"
        splits = [s for s in ("train", "val") if (ann_dir / f"instances_{s}2017.json").is_file()]
        if not splits:
            raise UsageError(f"--split all: no instances_train2017.json or instances_val2017.json in {ann_dir}")
    else:
        splits = [request.split]
    result = PackResult()
    for split in splits:
        ann_file, image_dir = default_paths(request.src_data_dir, split, request.ann_file)
        add_summary(result, pack_coco_split(ann_file, image_dir, request.target_data_dir, split,
                                            workers=request.workers, strict=request.strict))
    return result
