"""`hat pack cityscapes`: Cityscapes fine semantic segmentation, 19 training classes.

Source layout (the official ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``
unpacked into one folder)::

    SRC/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    SRC/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

``--split all`` packs train and val (whichever are present). The official test labels are
placeholders, so test is packed only when asked for by name, with a warning.

Labels: each pixel of a ``_labelIds.png`` holds a Cityscapes label id (0..33); `LABELS` maps it to
its training id exactly as cityscapesScripts' ``cityscapesscripts/helpers/labels.py`` does: the
19 evaluated classes get train ids 0..18 and every id with ``ignoreInEval`` (unlabeled, ego
vehicle, parking, guard rail, caravan, ...) gets `IGNORE_INDEX` (255). License plate (id -1) never
occurs in the PNGs. The meta records the class names and colours in train-id order, ``ignore_index``
and ``label_ids`` (the Cityscapes id of each class, to map predictions back for the official
evaluation).

A record's ``image`` is the ``_leftImg8bit.png`` file's bytes as they are, its ``mask`` the train-id
mask as an 8-bit greyscale PNG, ``file_name`` the image's path below ``leftImg8bit/<split>`` (e.g.
``aachen/aachen_000000_000019_leftImg8bit.png``). ``image_id`` is the image's position in the
sorted list of every ``*_leftImg8bit.png`` of the split (sorted by ``file_name``, rejected images
counted too), so an image's id depends only on which images the split holds.

Rejected (skipped and listed in ``<split>_lmdb.rejected.jsonl``; with ``--strict`` the first one
stops the pack): an image without its labelIds file, an image or labelIds file that cannot be
read or decoded, a labelIds file whose size differs from its image's (found from its header,
before it is decoded), one that is not an 8-bit grey or palette PNG (a 16-bit grey one too: the
official files are 8-bit; an RGB one is likely a ``_gtFine_color.png``), and one holding a value
that is not a Cityscapes label id. The labelIds files are read within the same ``--max-bytes``
and symlink policy as the images (`SourceReader` over SRC). A labelIds
file without an image loses no record: the split gets one warning that counts them. A missing
``gtFine/<split>`` folder is a usage error, as is a missing ``leftImg8bit/<split>``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hatcli.data.lmdb_format import IGNORE_INDEX
from hatcli.data.masks import encode_mask, png_size, read_mask, unknown_values
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
from hatcli.data.source_files import SourceReader, display_name
from hatcli.errors import UsageError
from hatcli.family import PackRequest, PackResult

FORMAT_REVISION = 1  # bump when what this packer writes changes, so old partial packs are not resumed
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
DEFAULT_SPLITS = ("train", "val")
"""What ``--split all`` packs: test is left out, its labels being placeholders."""
PLACEHOLDER_SPLITS = ("test",)

Colour = tuple[int, int, int]
LABELS: tuple[tuple[int, str, int, Colour], ...] = (
    # (label id, name, train id, colour), as cityscapesScripts' labels.py; 255 = ignoreInEval.
    (0, "unlabeled", 255, (0, 0, 0)),
    (1, "ego vehicle", 255, (0, 0, 0)),
    (2, "rectification border", 255, (0, 0, 0)),
    (3, "out of roi", 255, (0, 0, 0)),
    (4, "static", 255, (0, 0, 0)),
    (5, "dynamic", 255, (111, 74, 0)),
    (6, "ground", 255, (81, 0, 81)),
    (7, "road", 0, (128, 64, 128)),
    (8, "sidewalk", 1, (244, 35, 232)),
    (9, "parking", 255, (250, 170, 160)),
    (10, "rail track", 255, (230, 150, 140)),
    (11, "building", 2, (70, 70, 70)),
    (12, "wall", 3, (102, 102, 156)),
    (13, "fence", 4, (190, 153, 153)),
    (14, "guard rail", 255, (180, 165, 180)),
    (15, "bridge", 255, (150, 100, 100)),
    (16, "tunnel", 255, (150, 120, 90)),
    (17, "pole", 5, (153, 153, 153)),
    (18, "polegroup", 255, (153, 153, 153)),
    (19, "traffic light", 6, (250, 170, 30)),
    (20, "traffic sign", 7, (220, 220, 0)),
    (21, "vegetation", 8, (107, 142, 35)),
    (22, "terrain", 9, (152, 251, 152)),
    (23, "sky", 10, (70, 130, 180)),
    (24, "person", 11, (220, 20, 60)),
    (25, "rider", 12, (255, 0, 0)),
    (26, "car", 13, (0, 0, 142)),
    (27, "truck", 14, (0, 0, 70)),
    (28, "bus", 15, (0, 60, 100)),
    (29, "caravan", 255, (0, 0, 90)),
    (30, "trailer", 255, (0, 0, 110)),
    (31, "train", 16, (0, 80, 100)),
    (32, "motorcycle", 17, (0, 0, 230)),
    (33, "bicycle", 18, (119, 11, 32)),
)
"""The Cityscapes label table; license plate (id -1, train id -1) is left out: no PNG holds it."""

TRAINED = sorted((row for row in LABELS if row[2] != IGNORE_INDEX), key=lambda row: row[2])
CLASSES = [name for _id, name, _train_id, _colour in TRAINED]
"""The 19 class names in train-id order."""
PALETTE = [list(colour) for _id, _name, _train_id, colour in TRAINED]
CLASS_LABEL_IDS = [label_id for label_id, _name, _train_id, _colour in TRAINED]
MAX_LABEL_ID = max(row[0] for row in LABELS)

UNKNOWN_ID = 254
"""`TRAIN_ID_OF` entry of a value that is no label id (no train id is 254: they are 0..18 and 255)."""
TRAIN_ID_OF = np.full(256, UNKNOWN_ID, dtype=np.uint8)
TRAIN_ID_OF[[row[0] for row in LABELS]] = [row[2] for row in LABELS]
"""Label id (a uint8 pixel value) -> train id, `UNKNOWN_ID` for values outside the table."""
IS_LABEL_ID = TRAIN_ID_OF != UNKNOWN_ID

Item = tuple[str, str, int, str]  # image path, labelIds path, image_id, file_name


@dataclass
class Listing:
    """What `list_split` found in one split."""

    items: list[Item]
    signatures: list[list[Any]]
    rejections: list[dict[str, Any]] = field(default_factory=list)
    """Images without their labelIds file."""
    warnings: list[tuple[str, str]] = field(default_factory=list)
    """``(where, what)``: labelIds files without an image."""
    ignored: int = 0
    """Entries of the image folder that are not ``*_leftImg8bit.png`` files in a city folder."""


def split_folders(src: Path, split: str) -> tuple[Path, Path]:
    """``SRC/leftImg8bit/<split>`` and ``SRC/gtFine/<split>``; UsageError naming the one that is missing."""
    images, labels = Path(src) / "leftImg8bit" / split, Path(src) / "gtFine" / split
    layout = (f"expected {src}/leftImg8bit/<split>/<city>/*{IMAGE_SUFFIX} and "
              f"{src}/gtFine/<split>/<city>/*{LABEL_SUFFIX}")
    for folder in (images, labels):
        if not folder.is_dir():
            raise UsageError(f"no folder {folder}: {layout}")
    return images, labels


def _sorted_entries(folder: str | Path) -> list[os.DirEntry[str]]:
    return sorted(os.scandir(folder), key=lambda entry: entry.name)


def _label_files(label_dir: Path) -> set[str]:
    """``<city>/<name>`` of every labelIds file in the city folders of `label_dir`."""
    found = set()
    for city in _sorted_entries(label_dir):
        if city.is_dir():
            found.update(f"{city.name}/{e.name}" for e in _sorted_entries(city.path) if e.name.endswith(LABEL_SUFFIX))
    return found


def list_split(image_dir: Path, label_dir: Path) -> Listing:
    """Pair each ``<city>/*_leftImg8bit.png`` of `image_dir` with its labelIds file in `label_dir`.

    Items are in sorted ``file_name`` order; ``image_id`` is the position in that order, counting
    images rejected here (no labelIds file) too.
    """
    listing = Listing(items=[], signatures=[])
    labels = _label_files(label_dir)
    image_id = 0
    for city in _sorted_entries(image_dir):
        if not city.is_dir():
            listing.ignored += 1
            continue
        for entry in _sorted_entries(city.path):
            if not entry.name.endswith(IMAGE_SUFFIX) or entry.is_dir():
                listing.ignored += 1
                continue
            file_name = f"{city.name}/{entry.name}"
            label_name = f"{city.name}/{entry.name[:-len(IMAGE_SUFFIX)]}{LABEL_SUFFIX}"
            label_path = label_dir / label_name
            if label_name in labels:
                labels.discard(label_name)
                listing.items.append((entry.path, str(label_path), image_id, display_name(file_name)))
                listing.signatures.append([file_name, *file_signature(Path(entry.path)), *file_signature(label_path)])
            else:
                listing.rejections.append(rejection(entry.path, f"no labelIds file {display_name(label_path)}",
                                                    image_id=image_id, file_name=display_name(file_name)))
            image_id += 1
    if labels:
        first = display_name(label_dir / min(labels))
        listing.warnings.append((display_name(label_dir), f"{len(labels)} labelIds file(s) have no {IMAGE_SUFFIX} "
                                 f"image and are not packed (first: {first})"))
    return listing


def _unknown_ids_reason(values: list[int]) -> str:
    """The rejection reason for mask values that are not label ids (`values`: sorted, unique)."""
    shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
    if len(values) == 1:
        return f"label id {shown} is not a Cityscapes label id (0..{MAX_LABEL_ID})"
    return f"label ids {shown} are not Cityscapes label ids (0..{MAX_LABEL_ID})"


def to_train_ids(label_ids: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Map a uint8 [H, W] array of label ids to train ids: ``(train_ids, None)`` or ``(None, reason)``."""
    unknown = unknown_values(label_ids, IS_LABEL_ID)
    if unknown:
        return None, _unknown_ids_reason(unknown)
    return TRAIN_ID_OF[label_ids], None


def size_problem(label_data: bytes, image_size: tuple[int, int]) -> str | None:
    """Why a labelIds PNG cannot be its image's mask from its header alone (another size), or None.

    Checked before the mask is decoded, so no mask larger than its image (which passed the pixel
    limit) is ever decoded.
    """
    header = png_size(label_data)
    if header is None:
        return "the labelIds file is not a readable PNG file"
    if (header[1], header[0]) != image_size:
        return (f"the labelIds mask is {header[0]}x{header[1]} (WxH) but its image is "
                f"{image_size[1]}x{image_size[0]}")
    return None


def read_train_ids(label_data: bytes, image_size: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    """The train-id mask of a labelIds PNG of an image of `image_size` (height, width), or ``(None, reason)``.

    The PNG must be 8-bit grey or palette (`hatcli.data.masks.read_mask`); a 16-bit one is refused,
    as the official files are 8-bit.
    """
    reason = size_problem(label_data, image_size)
    if reason is not None:
        return None, reason
    label_ids, reason = read_mask(label_data)
    if label_ids is None:
        return None, reason
    return to_train_ids(label_ids)


def read_item(item: Item, source: SourceReader) -> Outcome:
    """Read and check one image and its labelIds file, map the labels to train ids (runs in the pack workers)."""
    image_path, label_path, image_id, file_name = item
    image, reason = source.read(image_path)
    size = None
    if image is not None:
        reason, size = source.check_image(image)
    if reason is not None:
        return Outcome(None, [rejection(image_path, reason, image_id=image_id, file_name=file_name)])
    assert image is not None and size is not None
    label_data, reason = source.read(label_path)
    train_ids = None
    if label_data is not None:
        train_ids, reason = read_train_ids(label_data, size)
    if train_ids is None:
        return Outcome(None, [rejection(label_path, str(reason), image_id=image_id, file_name=file_name)])
    return Outcome({"image": image, "mask": encode_mask(train_ids), "image_id": image_id, "file_name": file_name,
                    "height": size[0], "width": size[1]})


def pack_cityscapes_split(
    src: Path, target_data_dir: Path, split: str, *, workers: int = 0, strict: bool = False,
    on_item: Any = None, request: PackRequest | None = None,
) -> tuple[PackSummary, int]:
    """Pack one Cityscapes split into ``target/<split>_lmdb``.

    `request` gives the read limits and ``follow_symlinks`` (the defaults without one). Returns
    the summary and the number of ignored entries of the image folder.
    """
    image_dir, label_dir = split_folders(src, split)
    source = SourceReader.for_folder(src, request)
    listing = list_split(image_dir, label_dir)
    digest = pack_fingerprint("cityscapes", FORMAT_REVISION, split, listing.signatures, source.options())
    meta = {"source": "cityscapes", "ignore_index": IGNORE_INDEX, "palette": PALETTE, "label_ids": CLASS_LABEL_IDS}
    summary = run_pack(
        db=db_path(target_data_dir, split), kind="segmentation", split=split, classes=CLASSES,
        items=listing.items, read=functools.partial(read_item, source=source), source_fingerprint=digest,
        workers=workers, strict=strict, listing_rejections=listing.rejections, warnings=listing.warnings,
        extra_meta=meta, description=f"pack {split}", on_item=on_item,
    )
    return summary, listing.ignored


def splits_to_pack(src: Path, split: str) -> list[str]:
    """`split` itself, or for ``all`` the train and val folders present under ``SRC/leftImg8bit``."""
    if split != "all":
        return [split]
    found = [s for s in DEFAULT_SPLITS if (Path(src) / "leftImg8bit" / s).is_dir()]
    if not found:
        raise UsageError(f"--split all: no train or val folder in {Path(src) / 'leftImg8bit'}; expected "
                         f"{src}/leftImg8bit/<split>/<city>/*{IMAGE_SUFFIX} (test is packed only with --split test)")
    return found


def run(request: PackRequest) -> PackResult:
    """`hat pack cityscapes`: pack the requested split(s) of ``--src-data-dir``."""
    if request.src_data_dir is None:
        raise UsageError("`hat pack cityscapes` needs --src-data-dir (the folder with leftImg8bit/ and gtFine/)")
    result = PackResult()
    for split in splits_to_pack(request.src_data_dir, request.split):
        summary, ignored = pack_cityscapes_split(request.src_data_dir, request.target_data_dir, split,
                                                 workers=request.workers, strict=request.strict, request=request)
        add_summary(result, summary)
        if ignored:
            result.notes.append(f"{split}: ignored {ignored} entries that are not <city>/*{IMAGE_SUFFIX} files")
        if split in PLACEHOLDER_SPLITS:
            # Not a run_pack warning: those stop a --strict pack, and packing test was asked for.
            result.warnings.append(f"{split}: the official Cityscapes {split} labels are placeholders, not ground "
                                   f"truth: use these records for inference only, never to score a model")
    return result
