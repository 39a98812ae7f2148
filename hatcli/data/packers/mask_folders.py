"""Segmentation records from an image folder and a mask folder: ``images/<name>.jpg|png`` beside
``masks/<name>.png`` (one class index per pixel, 255 = ignore), as the shapes generator writes them.

Images are stored as they are; each mask is read as class indices (`hatcli.data.masks`) and
stored as an 8-bit greyscale PNG. Rejected, each with the file and the reason: an image without a
mask, an image or mask that cannot be read or decoded, a mask whose size differs from its image,
and a mask holding a value that is neither a class index nor 255.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from hatcli.data.lmdb_format import IGNORE_INDEX
from hatcli.data.masks import encode_mask, read_mask, unknown_values
from hatcli.data.packing import (
    Outcome,
    PackSummary,
    db_path,
    file_signature,
    pack_fingerprint,
    rejection,
    run_pack,
)
from hatcli.data.source_files import SourceReader
from hatcli.errors import DataError
from hatcli.family import PackRequest

FORMAT_REVISION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

Item = tuple[str, str, int, str]  # image path, mask path, image id, file name


def valid_values(num_classes: int) -> np.ndarray:
    """The 256-entry table of mask values a mask of `num_classes` classes may hold (0..C-1, 255)."""
    table = np.zeros(256, dtype=bool)
    table[:num_classes] = True
    table[IGNORE_INDEX] = True
    return table


def segmentation_record(image: bytes, image_size: tuple[int, int], labels: np.ndarray, valid: np.ndarray,
                        image_id: int, file_name: str) -> tuple[dict[str, Any] | None, str | None]:
    """A segmentation record of an image (its bytes and (height, width)) and its label map, or
    (None, why not): a label map of another size, or holding values `valid` does not allow."""
    height, width = image_size
    if labels.shape != (height, width):
        return None, (f"the mask is {labels.shape[1]}x{labels.shape[0]} (WxH) but the image is "
                      f"{width}x{height}")
    bad = unknown_values(labels, valid)
    if bad:
        allowed = int(np.flatnonzero(valid[:IGNORE_INDEX]).max()) if valid[:IGNORE_INDEX].any() else -1
        return None, (f"the mask holds value{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:8]))}: "
                      f"a mask holds class indices 0..{allowed} and {IGNORE_INDEX} (ignore)")
    return {"image": image, "mask": encode_mask(labels), "image_id": image_id, "file_name": file_name,
            "height": height, "width": width}, None


def list_pairs(image_dir: Path, mask_dir: Path) -> tuple[list[Item], list[dict[str, Any]]]:
    """The (image, mask) items of the two folders in sorted name order, and a rejection for every
    image without a mask."""
    if not image_dir.is_dir():
        raise DataError(f"no image folder {image_dir}")
    items: list[Item] = []
    rejected: list[dict[str, Any]] = []
    for entry in sorted(os.scandir(image_dir), key=lambda e: e.name):
        if entry.is_dir() or not entry.name.lower().endswith(IMAGE_SUFFIXES):
            continue
        mask = mask_dir / (Path(entry.name).stem + ".png")
        if not mask.is_file():
            rejected.append(rejection(entry.path, f"no mask {mask}"))
            continue
        items.append((entry.path, str(mask), len(items) + len(rejected), entry.name))
    return items, rejected


def read_pair(item: Item, source: SourceReader, valid: np.ndarray) -> Outcome:
    """Read and validate one image and its mask (runs in the pack workers)."""
    image_path, mask_path, image_id, file_name = item
    data, reason = source.read(image_path)
    size = None
    if data is not None:
        reason, size = source.check_image(data)
    if reason is not None:
        return Outcome(None, [rejection(image_path, reason)])
    mask_data, reason = source.read(mask_path)
    labels = None
    if mask_data is not None:
        labels, reason = read_mask(mask_data)
    if reason is None:
        record, reason = segmentation_record(data, size, labels, valid, image_id, file_name)  # type: ignore[arg-type]
        if record is not None:
            return Outcome(record)
    return Outcome(None, [rejection(mask_path, reason, image=file_name)])


def pack_mask_folders(
    image_dir: Path, mask_dir: Path, target_data_dir: Path, split: str, classes: list[str], *,
    palette: list[tuple[int, int, int]], source: str, extra_meta: dict[str, Any] | None = None,
    request: PackRequest | None = None,
) -> PackSummary:
    """Pack the image/mask pairs of two folders into ``target/<split>_lmdb`` as segmentation records
    of `classes` (mask value = position in `classes`), with `palette` (one RGB per class)."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    reader = SourceReader.for_folder(image_dir.parent, request)
    items, listing_rejections = list_pairs(image_dir, mask_dir)
    signatures = [[item[3], *file_signature(Path(item[0])), *file_signature(Path(item[1]))] for item in items]
    meta = {"source": source, "ignore_index": IGNORE_INDEX, "palette": [list(c) for c in palette],
            **(extra_meta or {})}
    digest = pack_fingerprint("mask_folders", FORMAT_REVISION, split, classes, signatures, meta, reader.options())
    return run_pack(
        db=db_path(target_data_dir, split), kind="segmentation", split=split, classes=list(classes), items=items,
        read=functools.partial(read_pair, source=reader, valid=valid_values(len(classes))),
        source_fingerprint=digest, workers=request.workers if request else 0,
        strict=request.strict if request else False, listing_rejections=listing_rejections, extra_meta=meta,
        description=f"pack {split}",
    )
