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

import functools
import json
import math
from pathlib import Path, PurePosixPath
from typing import Any

from hatcli.data.packing import (
    Outcome,
    PackSummary,
    add_summary,
    db_path,
    file_signature,
    pack_fingerprint,
    rejection,
    run_pack,
)
from hatcli.data.source_files import SourceReader
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


def is_int(value: Any) -> bool:
    """Whether a json value is an integer that msgpack stores (a bool is not an integer here)."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def is_number(value: Any) -> bool:
    """Whether a json value is a finite number (not a bool, not NaN or infinite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_text(value: Any) -> bool:
    """Whether a json value is a string that is valid Unicode (json allows lone surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _categories(coco: dict[str, Any], ann_file: Path) -> list[dict[str, Any]]:
    seen: set[int] = set()
    categories = []
    for i, cat in enumerate(coco["categories"]):
        if (not isinstance(cat, dict) or not is_int(cat.get("id")) or not is_text(cat.get("name"))
                or not is_text(cat.get("supercategory", ""))):
            raise DataError(f"{ann_file}: categories[{i}] needs an integer `id`, a text `name` and, if any, a text "
                            f"`supercategory` (got {cat!r:.200}); fix the annotation file")
        if cat["id"] in seen:
            raise DataError(f"{ann_file}: category id {cat['id']} appears twice; category ids must be unique")
        seen.add(cat["id"])
        categories.append({"id": cat["id"], "name": cat["name"], "supercategory": cat.get("supercategory", "")})
    if not categories:
        raise DataError(f"{ann_file} lists no categories")
    return sorted(categories, key=lambda c: c["id"])


def _safe_file(image_dir: Path, file_name: Any) -> Path | None:
    """The image's path inside `image_dir`, or None when `file_name` would leave that folder."""
    if not is_text(file_name) or not file_name:
        return None
    pure = PurePosixPath(file_name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        return None
    return image_dir.joinpath(*pure.parts)


def _image_problem(im: dict[str, Any], image_dir: Path) -> str | None:
    """Why the image entry `im` (an object with an integer id) cannot be packed, or None."""
    if _safe_file(image_dir, im.get("file_name")) is None:
        return f"file_name {im.get('file_name')!r} is not a relative path inside {image_dir}"
    for key in ("height", "width"):
        if not is_int(im.get(key)) or not 0 < im[key] < 2**31:
            return f"image `{key}` must be a positive integer, got {im.get(key)!r}"
    return None


def _box_problem(bbox: Any, width: int, height: int) -> str | None:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
        return f"bbox must be [x, y, width, height] of finite numbers, got {bbox!r}"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"box {bbox} has non-positive size"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"box {bbox} lies outside its {width}x{height} image"
    return None


def _annotation_problem(ann: dict[str, Any], image: dict[str, Any] | None, label_of: dict[int, int]) -> str | None:
    """Why the annotation `ann` (an object whose id, if any, is an integer) cannot be packed, or None."""
    if not is_int(ann.get("image_id")):
        return f"annotation `image_id` must be an integer, got {ann.get('image_id')!r}"
    if image is None:
        return f"annotation refers to image id {ann['image_id']}, which is not among the usable images"
    category = ann.get("category_id")
    if not is_int(category):
        return f"annotation `category_id` must be an integer, got {category!r}"
    if category not in label_of:
        return f"unknown category id {category!r}"
    problem = _box_problem(ann.get("bbox"), image["width"], image["height"])
    if problem is not None:
        return f"{problem} ({image['file_name']})"
    if "area" in ann and not (is_number(ann["area"]) and ann["area"] >= 0):
        return f"annotation `area` must be a non-negative number, got {ann['area']!r}"
    crowd = ann.get("iscrowd", 0)
    if not (isinstance(crowd, bool) or (is_int(crowd) and crowd in (0, 1))):
        return f"annotation `iscrowd` must be 0, 1, true or false, got {ann.get('iscrowd')!r}"
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
        if not isinstance(im, dict) or not is_int(im.get("id")):
            if not isinstance(im, dict):
                rejected.append(rejection(where, f"image entry is not an object: {im!r:.200}"))
                continue
            rejected.append(rejection(where, f"image entry needs an integer `id`, got {im.get('id')!r:.200}",
                                      image_id=im.get("id")))
            continue
        if im["id"] in images:
            rejected.append(rejection(where, f"duplicate image id {im['id']} (first used by "
                                             f"{images[im['id']]['file_name']}); the later entry is skipped",
                                      image_id=im["id"]))
            continue
        problem = _image_problem(im, image_dir)
        if problem is not None:
            rejected.append(rejection(where, problem, image_id=im["id"]))
            continue
        images[im["id"]] = {"id": im["id"], "file_name": im["file_name"], "height": im["height"],
                            "width": im["width"], "path": str(_safe_file(image_dir, im["file_name"]))}
    anns: dict[int, list[Annotation]] = {image_id: [] for image_id in images}
    ann_ids: set[int] = set()
    for i, ann in enumerate(coco["annotations"]):
        where = f"{ann_file}#annotations[{i}]"
        if not isinstance(ann, dict):
            rejected.append(rejection(where, "annotation is not an object"))
            continue
        ann_id = ann.get("id")
        if ann_id is not None and not is_int(ann_id):
            rejected.append(rejection(where, f"annotation `id` must be an integer, got {ann_id!r:.200}", ann_id=ann_id))
            continue
        if ann_id is not None and ann_id in ann_ids:
            rejected.append(rejection(where, f"duplicate annotation id {ann_id}; the later one is skipped",
                                      ann_id=ann_id))
            continue
        ann_ids.add(ann_id)  # type: ignore[arg-type]
        image = images.get(ann["image_id"]) if is_int(ann.get("image_id")) else None
        problem = _annotation_problem(ann, image, label_of)
        if problem is not None:
            rejected.append(rejection(where, problem, ann_id=ann_id))
            continue
        assert image is not None
        bbox = [float(v) for v in ann["bbox"]]
        area = float(ann.get("area", bbox[2] * bbox[3]))
        anns[image["id"]].append((bbox, label_of[ann["category_id"]], ann["category_id"],
                                  int(ann.get("iscrowd", 0)), area, -1 if ann_id is None else ann_id))
    items: list[Item] = [(images[i]["path"], images[i], anns[i]) for i in sorted(images)]
    return categories, items, rejected


def read_item(item: Item, source: SourceReader) -> Outcome:
    """Read and validate one image and attach its annotations (runs in the pack workers)."""
    path, image, anns = item
    data, reason = source.read(path)
    size = None
    if data is not None:
        reason, size = source.check_image(data)
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
    request: PackRequest | None = None,
) -> PackSummary:
    """Pack one COCO-format split into ``target/<split>_lmdb``.

    `request` gives the read limits and ``follow_symlinks`` (the defaults without one).
    """
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    source = SourceReader.for_folder(image_dir, request)
    categories, items, listing_rejections = list_coco(ann_file, image_dir)
    signatures = [[item[1]["file_name"], *file_signature(Path(item[0]))] for item in items]
    digest = pack_fingerprint("coco", FORMAT_REVISION, split, file_signature(ann_file), signatures, extra_meta,
                         source.options())
    meta = {
        "source": "coco",
        "ann_file": ann_file.name,
        "category_ids": [c["id"] for c in categories],
        "coco_categories": categories,
        **(extra_meta or {}),
    }
    return run_pack(
        db=db_path(target_data_dir, split), kind="detection", split=split,
        classes=[c["name"] for c in categories], items=items, read=functools.partial(read_item, source=source),
        source_fingerprint=digest,
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
                                            workers=request.workers, strict=request.strict, request=request))
    return result
