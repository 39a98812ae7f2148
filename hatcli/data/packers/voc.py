"""`hat pack voc`: Pascal VOC (2007, 2012, or your own data in its layout) as detection or segmentation records.

Source layout: ``--src-data-dir`` is the VOC folder itself (e.g. ``VOCdevkit/VOC2012``), or a folder
that holds exactly one ``VOC*/`` or ``VOCdevkit/VOC*/`` folder of this layout::

    JPEGImages/<id>.jpg                   every task
    Annotations/<id>.xml                  detection
    ImageSets/Main/<split>.txt            detection: one image id per line
    ImageSets/Segmentation/<split>.txt    segmentation (without it: the Main list, restricted to
                                          the ids that have a mask, with a note)
    SegmentationClass/<id>.png            segmentation: palette PNGs of class indices

``--task detection`` (also what ``classification``, the CLI's default, means for VOC) writes the
COCO detection records (`hatcli.data.lmdb_format`), so every detection family trains on VOC as on
COCO, plus VOC's per-box ``difficult`` and ``truncated`` flags (0/1; a missing tag is 0). Labels
follow `VOC_CLASSES` (0 .. 19); ``category_ids`` are label + 1. ``--task segmentation`` writes
segmentation records whose ``mask`` is an 8-bit greyscale PNG of class indices into
`SEGMENTATION_CLASSES` (``background`` = 0, then the 20 classes), 255 on VOC's object borders
(``ignore_index``); the meta ``palette`` is VOC's colour map (`hatcli.data.palette.voc_colormap`).

Image ids (`image_ids`): an id of the form ``YYYY_NNNNNN`` becomes the integer of its digits
(``2008_000123`` -> 2008000123) and an all-digit id its value (VOC2007's ``000005`` -> 5), so the
same image keeps its image id in every split. When any id of a split has another form (or two ids
would share a number) every image of the split gets its position in the sorted id list instead;
the meta ``image_id_rule`` says which rule was used (``"number"`` or ``"position"``).

Boxes: VOC's ``<bndbox>`` xmin/ymin/xmax/ymax are 1-based, inclusive pixel indices. In hat's
continuous pixel frame (pixel (i, j) covers [j, j+1) x [i, i+1)) the box is x0 = xmin - 1,
y0 = ymin - 1, x1 = xmax, y1 = ymax, so the stored COCO box is ``[xmin - 1, ymin - 1,
xmax - xmin + 1, ymax - ymin + 1]`` (a box from 1 to W covers the W pixels of the row: x 0, width W).
Coordinates may be written as decimals (``273.0``); anything else that is not a number is rejected.

Rejected (listed in ``<split>_lmdb.rejected.jsonl`` with the file, the VOC id and the reason; with
``--strict`` the first one stops the pack):

- the whole image: a listed id whose XML is missing or unparseable or has no usable ``<size>``; an
  image that is missing, undecodable or of another size than the XML says; for segmentation a mask
  that is missing, not a single-channel (palette "P" or greyscale "L") PNG, of another size than
  the image, or holding a value that is neither a class index (0 .. 20) nor 255;
- one box (``<xml>#object[i]``; the image and its other boxes are kept, as `coco` does with a bad
  annotation): an unknown class name, a missing or non-numeric coordinate, xmax < xmin or
  ymax < ymin, a box outside its image by more than `BOX_TOLERANCE` pixel, a ``difficult`` or
  ``truncated`` flag that is not 0 or 1.

Ids listed twice are packed once (a warning). The XML is parsed with the standard library
(expat: no external entities, bounded entity expansion), each file within ``--max-bytes``.
"""

from __future__ import annotations

import functools
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from hatcli.data.lmdb_format import IGNORE_INDEX
from hatcli.data.masks import png_size, read_mask
from hatcli.data.packers.coco import is_number
from hatcli.data.packers.mask_folders import segmentation_record, valid_values
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
from hatcli.data.palette import voc_colormap
from hatcli.data.source_files import SourceReader
from hatcli.errors import DataError, UsageError
from hatcli.family import PackRequest, PackResult

if TYPE_CHECKING:
    import numpy as np

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
"""The 20 VOC classes in the devkit's order: detection label = position."""
SEGMENTATION_CLASSES = ("background", *VOC_CLASSES)
"""Segmentation mask values 0 .. 20."""
BOX_TOLERANCE = 1.0
"""Pixels a box may stick out of its image (a few VOC boxes start at 0 or end at W + 1)."""
FORMAT_REVISION = 1  # bump when what this packer writes changes, so old partial packs are not resumed
SPLITS_OF_ALL = ("train", "val")
LAYOUT = ("JPEGImages/, Annotations/ and ImageSets/Main/<split>.txt (detection), or JPEGImages/, "
          "SegmentationClass/ and ImageSets/Segmentation/<split>.txt (segmentation)")

_YEAR_ID = re.compile(r"([0-9]{4})_([0-9]{6})")
_DIGITS_ID = re.compile(r"[0-9]{1,18}")
_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")

Item = tuple[str, int, str, str]  # (VOC id, image id, image path, annotation path: the XML or the mask)
Box = tuple[list[float], int, int, int]  # (xywh, label, difficult, truncated)


# -- source layout and listing ------------------------------------------------------------------


def _has_layout(folder: Path) -> bool:
    return (folder / "JPEGImages").is_dir() and (folder / "ImageSets").is_dir()


def find_voc_root(src: Path | None) -> Path:
    """The VOC folder of `src`: `src` itself, or its one ``VOC*`` / ``VOCdevkit/VOC*`` folder; UsageError otherwise."""
    if src is None:
        raise UsageError("`hat pack voc` needs --src-data-dir: the VOC folder (e.g. VOCdevkit/VOC2012) holding "
                         + LAYOUT)
    src = Path(src)
    if not src.is_dir():
        raise UsageError(f"--src-data-dir {src} is not a folder")
    if _has_layout(src):
        return src
    found = [p for pattern in ("VOC*", "VOCdevkit/VOC*") for p in sorted(src.glob(pattern)) if _has_layout(p)]
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(str(p.relative_to(src)) for p in found)
        raise UsageError(f"{src} holds several VOC folders ({names}); pass the one to pack as --src-data-dir")
    raise UsageError(f"{src} is not a Pascal VOC folder: expected {LAYOUT} in it (or in its one VOC*/ or "
                     f"VOCdevkit/VOC*/ folder)")


def _list_file(root: Path, task: str, split: str) -> tuple[Path, bool]:
    """The id list of `split` and whether it is the Main list standing in for a missing Segmentation one."""
    main = root / "ImageSets" / "Main" / f"{split}.txt"
    if task == "detection":
        return main, False
    segmentation = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if segmentation.is_file() or not main.is_file():
        return segmentation, False
    return main, True


def splits_to_pack(root: Path, task: str, split: str) -> list[str]:
    """`split` itself, or for ``all`` those of train and val that have an id list."""
    if split != "all":
        return [split]
    found = [s for s in SPLITS_OF_ALL if _list_file(root, task, s)[0].is_file()]
    if not found:
        folder = "Main" if task == "detection" else "Segmentation"
        raise UsageError(f"--split all: no train.txt or val.txt in {root / 'ImageSets' / folder}; "
                         f"name the split with --split")
    return found


def _is_plain_id(voc_id: str) -> bool:
    """Whether an id names a file inside its folder (no separators, not `.` or `..`)."""
    return PurePosixPath(voc_id).name == voc_id and voc_id not in (".", "..") and "\\" not in voc_id


def read_id_list(list_file: Path) -> tuple[list[str], list[dict[str, Any]], list[tuple[str, str]]]:
    """The sorted unique ids of an ImageSets list (first word of each line), rejected ids, warnings."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the id list {list_file}: {exc}") from None
    ids: set[str] = set()
    rejected, twice = [], []
    for number, line in enumerate(lines, start=1):
        words = line.split()
        if not words:
            continue
        if not _is_plain_id(words[0]):
            rejected.append(rejection(f"{list_file}:{number}", f"id {words[0]!r} is not a plain file name",
                                      voc_id=words[0]))
        elif words[0] in ids:
            twice.append(words[0])
        else:
            ids.add(words[0])
    warnings = [(str(list_file), f"{len(twice)} ids are listed more than once (packed once): {', '.join(twice[:5])}")
                ] if twice else []
    return sorted(ids), rejected, warnings


def numeric_image_id(voc_id: str) -> int | None:
    """The integer an id stands for (``2008_000123`` -> 2008000123, ``000005`` -> 5), or None."""
    year = _YEAR_ID.fullmatch(voc_id)
    if year is not None:
        return int(year.group(1) + year.group(2))
    return int(voc_id) if _DIGITS_ID.fullmatch(voc_id) else None


def image_ids(voc_ids: list[str]) -> tuple[list[int], str]:
    """The image id of each of the sorted `voc_ids` and the rule used: ``"number"`` or ``"position"``."""
    numbers = [numeric_image_id(voc_id) for voc_id in voc_ids]
    if None not in numbers and len(set(numbers)) == len(numbers):
        return numbers, "number"  # type: ignore[return-value]
    return list(range(len(voc_ids))), "position"


@dataclass
class Listing:
    """What `list_split` found: the items to read and what the listing itself reports."""

    list_file: Path
    items: list[Item]
    image_id_rule: str
    rejected: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def list_split(root: Path, task: str, split: str) -> Listing:
    """List the images of `split` for `task` ("detection" or "segmentation"); UsageError for a missing list."""
    list_file, from_main = _list_file(root, task, split)
    if not list_file.is_file():
        also = f" (nor {root / 'ImageSets' / 'Main' / f'{split}.txt'})" if task == "segmentation" else ""
        raise UsageError(f"no id list {list_file}{also} for --split {split}; the VOC layout is {LAYOUT}")
    ids, rejected, warnings = read_id_list(list_file)
    notes = []
    masks = root / "SegmentationClass"
    if from_main:
        listed = len(ids)
        ids = [voc_id for voc_id in ids if (masks / f"{voc_id}.png").is_file()]
        notes.append(f"{split}: no {root / 'ImageSets' / 'Segmentation' / f'{split}.txt'}: packing the {len(ids)} "
                     f"of {listed} ids of {list_file} that have a mask in {masks}")
    numbers, rule = image_ids(ids)
    annotations = root / "Annotations" if task == "detection" else masks
    suffix = ".xml" if task == "detection" else ".png"
    items = [(voc_id, image_id, str(root / "JPEGImages" / f"{voc_id}.jpg"), str(annotations / f"{voc_id}{suffix}"))
             for voc_id, image_id in zip(ids, numbers)]
    return Listing(list_file, items, rule, rejected, warnings, notes)


# -- detection: the XML annotations -------------------------------------------------------------


def _number(text: str | None) -> float | None:
    """A coordinate's value: a decimal number (``273`` or ``273.0``), or None."""
    if text is None or not _DECIMAL.fullmatch(text.strip()):
        return None
    value = float(text)
    return value if is_number(value) else None


def _image_size(root: ET.Element) -> tuple[int, int] | str:
    """(height, width) from ``<size>``, or why it is unusable."""
    size = []
    for tag in ("height", "width"):
        text = root.findtext(f"size/{tag}")
        value = _number(text)
        if value is None or not value.is_integer() or not 0 < value < 2**31:
            return f"<size><{tag}> must be a positive whole number, got {text!r}"
        size.append(int(value))
    return size[0], size[1]


def _flag(obj: ET.Element, tag: str) -> int | str:
    """A 0/1 flag of an ``<object>`` (a missing or empty tag is 0), or why it is bad."""
    text = (obj.findtext(tag) or "0").strip() or "0"
    return int(text) if text in ("0", "1") else f"<{tag}> must be 0 or 1, got {text!r}"


def parse_object(obj: ET.Element, height: int, width: int) -> Box | str:
    """One ``<object>`` as (xywh box in hat's pixel frame, label, difficult, truncated), or why it is rejected."""
    name = (obj.findtext("name") or "").strip()
    if name not in VOC_CLASSES:
        return f"unknown class name {name!r}: the VOC classes are {', '.join(VOC_CLASSES)}"
    flags = [_flag(obj, "difficult"), _flag(obj, "truncated")]
    problem = next((f for f in flags if isinstance(f, str)), None)
    if problem is not None:
        return problem
    corners = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        text = obj.findtext(f"bndbox/{tag}")
        value = _number(text)
        if value is None:
            return f"<bndbox><{tag}> must be a number, got {text!r}"
        corners.append(value)
    xmin, ymin, xmax, ymax = corners
    shown = f"box (xmin, ymin, xmax, ymax) = ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g})"
    if xmax < xmin or ymax < ymin:
        return f"{shown} has xmax < xmin or ymax < ymin"
    x0, y0, x1, y1 = xmin - 1, ymin - 1, xmax, ymax  # 1-based inclusive indices -> continuous frame
    t = BOX_TOLERANCE
    if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
        return f"{shown} lies outside its {width}x{height} image (1-based inclusive, {t:g} pixel of slack)"
    return [x0, y0, x1 - x0, y1 - y0], VOC_CLASSES.index(name), int(flags[0]), int(flags[1])


def _read_image(source: SourceReader, path: str) -> tuple[bytes | None, tuple[int, int] | None, str | None]:
    """An image's bytes and (height, width), or the reason it is rejected."""
    data, reason = source.read(path)
    size = None
    if data is not None:
        reason, size = source.check_image(data)
    return (data, size, None) if reason is None else (None, None, reason)


def _size_problem(what: str, size: tuple[int, int], expected: tuple[int, int], of: str) -> str | None:
    if size == expected:
        return None
    return f"{what} is {size[1]}x{size[0]} (WxH) but {of} is {expected[1]}x{expected[0]}"


def read_detection_item(item: Item, source: SourceReader) -> Outcome:
    """Read one image and its XML annotation into a detection record (runs in the pack workers)."""
    voc_id, image_id, image_path, xml_path = item
    ids = {"voc_id": voc_id, "image_id": image_id}
    xml, reason = source.read(xml_path)
    if xml is None:
        return Outcome(None, [rejection(xml_path, f"listed id {voc_id} has no readable annotation file ({reason})", **ids)])
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        return Outcome(None, [rejection(xml_path, f"unparseable XML: {exc}", **ids)])
    size = _image_size(root)
    if isinstance(size, str):
        return Outcome(None, [rejection(xml_path, size, **ids)])
    data, real_size, reason = _read_image(source, image_path)
    if reason is None:
        reason = _size_problem("the image", real_size, size, f"{Path(xml_path).name} says it")  # type: ignore[arg-type]
    if reason is not None:
        return Outcome(None, [rejection(image_path, reason, **ids)])
    boxes: list[Box] = []
    rejections = []
    for index, obj in enumerate(root.findall("object")):
        parsed = parse_object(obj, *size)
        if isinstance(parsed, str):
            rejections.append(rejection(f"{xml_path}#object[{index}]", parsed, **ids, object=index))
        else:
            boxes.append(parsed)
    return Outcome({
        "image": data,
        "image_id": image_id,
        "file_name": f"{voc_id}.jpg",
        "height": size[0],
        "width": size[1],
        "boxes": [b[0] for b in boxes],
        "labels": [b[1] for b in boxes],
        "category_ids": [b[1] + 1 for b in boxes],
        "iscrowd": [0] * len(boxes),
        "area": [b[0][2] * b[0][3] for b in boxes],
        "difficult": [b[2] for b in boxes],
        "truncated": [b[3] for b in boxes],
    }, rejections)


# -- segmentation: the class masks --------------------------------------------------------------


def mask_size_problem(mask_data: bytes, image_size: tuple[int, int]) -> str | None:
    """Why a mask file cannot be its image's mask, from its PNG header alone (not a PNG, another size), or None.

    Checked before the mask is decoded, so a mask can never decode to more pixels than its image.
    """
    header = png_size(mask_data)
    if header is None:
        return "the mask is not a readable PNG file"
    return _size_problem("the mask", (header[1], header[0]), image_size, "its image")


def read_segmentation_item(item: Item, source: SourceReader, valid: np.ndarray) -> Outcome:
    """Read one image and its class mask into a segmentation record (runs in the pack workers).

    `valid` is the 256-entry table of the mask values allowed (0 .. 20 and 255).
    """
    voc_id, image_id, image_path, mask_path = item
    ids = {"voc_id": voc_id, "image_id": image_id}
    data, size, reason = _read_image(source, image_path)
    if reason is not None:
        return Outcome(None, [rejection(image_path, reason, **ids)])
    assert data is not None and size is not None
    mask_data, reason = source.read(mask_path)
    if mask_data is None:
        return Outcome(None, [rejection(mask_path, f"listed id {voc_id} has no readable mask ({reason})", **ids)])
    reason = mask_size_problem(mask_data, size)
    if reason is None:
        # VOC's palette ("P") masks hold the class indices: read as they are, never through the colours.
        indices, reason = read_mask(mask_data)
    if reason is None:
        record, reason = segmentation_record(data, size, indices, valid, image_id, f"{voc_id}.jpg")
        if record is not None:
            return Outcome(record)
    return Outcome(None, [rejection(mask_path, reason, **ids)])  # type: ignore[arg-type]


# -- packing ------------------------------------------------------------------------------------


def _task_meta(task: str) -> tuple[list[str], dict[str, Any]]:
    """The class names and the task's meta keys."""
    if task == "segmentation":
        palette = [list(rgb) for rgb in voc_colormap(len(SEGMENTATION_CLASSES))]
        return list(SEGMENTATION_CLASSES), {"ignore_index": IGNORE_INDEX, "palette": palette}
    categories = [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(VOC_CLASSES)]
    return list(VOC_CLASSES), {"category_ids": [c["id"] for c in categories], "coco_categories": categories}


def _check_task_folders(root: Path, task: str) -> None:
    needed = "Annotations" if task == "detection" else "SegmentationClass"
    if not (root / needed).is_dir():
        raise UsageError(f"no {needed}/ folder in {root}: --task {task} needs it (the VOC layout is {LAYOUT})")


def pack_voc_split(
    root: Path, target_data_dir: Path, split: str, task: str = "detection", *, workers: int = 0,
    strict: bool = False, on_item: Any = None, request: PackRequest | None = None,
) -> tuple[PackSummary, list[str]]:
    """Pack one split of the VOC folder `root` into ``target/<split>_lmdb`` as `task` records.

    `task` is "detection" or "segmentation"; `request` gives the read limits and
    ``follow_symlinks`` (the defaults without one). Returns the summary and notes for the user.
    """
    if task not in ("detection", "segmentation"):
        raise UsageError(f"`hat pack voc` packs detection or segmentation records, not {task}")
    root = Path(root)
    _check_task_folders(root, task)
    source = SourceReader.for_folder(root, request)
    listing = list_split(root, task, split)
    signatures = [[voc_id, *file_signature(Path(image)), *file_signature(Path(annotation))]
                  for voc_id, _, image, annotation in listing.items]
    digest = pack_fingerprint("voc", FORMAT_REVISION, task, split, file_signature(listing.list_file), signatures,
                              source.options())
    classes, task_meta = _task_meta(task)
    if task == "detection":
        read = functools.partial(read_detection_item, source=source)
    else:
        read = functools.partial(read_segmentation_item, source=source, valid=valid_values(len(classes)))
    summary = run_pack(
        db=db_path(target_data_dir, split), kind=task, split=split, classes=classes, items=listing.items,
        read=read, source_fingerprint=digest, workers=workers, strict=strict,
        listing_rejections=listing.rejected, warnings=listing.warnings,
        extra_meta={"source": "voc", "image_id_rule": listing.image_id_rule, **task_meta},
        description=f"pack {split}", on_item=on_item,
    )
    return summary, listing.notes


def run(request: PackRequest) -> PackResult:
    """`hat pack voc`: pack the requested split(s) as detection (the default) or segmentation records."""
    task = "segmentation" if request.task == "segmentation" else "detection"  # classification: detection
    root = find_voc_root(request.src_data_dir)
    _check_task_folders(root, task)
    result = PackResult()
    if request.src_data_dir is not None and root != Path(request.src_data_dir):
        result.notes.append(f"packing the VOC folder {root}")
    for split in splits_to_pack(root, task, request.split):
        summary, notes = pack_voc_split(root, request.target_data_dir, split, task, workers=request.workers,
                                        strict=request.strict, request=request)
        result.notes.extend(notes)
        add_summary(result, summary)
    return result
