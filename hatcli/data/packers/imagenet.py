"""`hat pack imagenet`: a class-per-folder image tree (ImageNet, or any folder of classes).

Source layout: ``SRC/<split>/<class>/<image>`` (or ``SRC/<class>/<image>`` when SRC itself is
the split folder). Classes are the sub-folder names in sorted order (label = position); images
are taken in sorted order and stored as their encoded bytes, never re-encoded. Files whose
suffix is not an image suffix are ignored (and counted); image files that cannot be read or
decoded are rejected.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
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
from hatcli.data.source_files import SourceReader, display_name, name_fields, symlink_problem
from hatcli.errors import DataError, UsageError
from hatcli.family import PackRequest, PackResult

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FORMAT_REVISION = 1  # bump when what this packer writes changes, so old partial packs are not resumed

Item = tuple[str, int, str]  # (path to read, label, name stored in the record)


def split_folder(src: Path, split: str) -> Path:
    """The folder of `split` under `src`: ``src/<split>``, or `src` itself when it holds class folders."""
    src = Path(src)
    if not src.is_dir():
        raise UsageError(f"--src-data-dir {src} is not a folder")
    if (src / split).is_dir():
        return src / split
    children = [p for p in src.iterdir() if p.is_dir()]
    if children and not any(c.name in ("train", "val", "test") for c in children):
        return src  # already a folder of classes
    found = ", ".join(sorted(c.name for c in children)) or "nothing"
    raise UsageError(f"no `{split}` folder in {src} (it holds {found}); expected {src}/{split}/<class>/<image>")


@dataclass
class Listing:
    """What `list_images` found in a split folder."""

    classes: list[str]
    """Class names in label order (sorted folder names, shown as text: see `display_name`)."""
    items: list[Item]
    signatures: list[list[Any]]
    ignored: int
    """Entries skipped because they are not image files."""
    empty: list[tuple[str, str]] = field(default_factory=list)
    """``(class folder, warning)`` for each class folder without images."""


def _class_folders(folder: Path, follow_symlinks: bool) -> list[os.DirEntry[str]]:
    """The class sub-folders of `folder` in sorted order; DataError for one that symlinks out of it."""
    root = os.path.realpath(folder)
    entries = sorted((e for e in os.scandir(folder) if e.is_dir()), key=lambda e: e.name)
    for entry in entries:
        problem = None if follow_symlinks or not entry.is_symlink() else symlink_problem(entry.path, root)
        if problem is not None:
            raise DataError(f"class folder {display_name(entry.path)}: {problem} (or copy the class into the folder)")
    return entries


def list_images(folder: Path, follow_symlinks: bool = False) -> Listing:
    """Classes, items and their file signatures, ignored non-image files and empty class folders."""
    class_entries = _class_folders(folder, follow_symlinks)
    if not class_entries:
        raise DataError(f"{folder} has no class folders (expected {folder}/<class>/<image>.jpg)")
    listing = Listing(classes=[display_name(e.name) for e in class_entries], items=[], signatures=[], ignored=0)
    for label, class_entry in enumerate(class_entries):
        name = class_entry.name
        before = len(listing.items)
        for entry in sorted(os.scandir(class_entry.path), key=lambda e: e.name):
            if not entry.name.lower().endswith(IMAGE_SUFFIXES) or entry.is_dir():
                listing.ignored += 1
                continue
            listing.items.append((entry.path, label, f"{name}/{entry.name}"))
            listing.signatures.append([f"{name}/{entry.name}", *file_signature(Path(entry.path))])
        if len(listing.items) == before:
            listing.empty.append((f"class folder {display_name(class_entry.path)}",
                                  f"holds no {'/'.join(IMAGE_SUFFIXES)} images: class "
                                  f"`{listing.classes[label]}` (label {label}) gets no records"))
    if not listing.items:
        raise DataError(f"{folder} has class folders but no {'/'.join(IMAGE_SUFFIXES)} images in them")
    return listing


def read_item(item: Item, source: SourceReader) -> Outcome:
    """Read and validate one image file (runs in the pack workers)."""
    path, label, name = item
    data, reason = source.read(path)
    if data is not None:
        reason, _size = source.check_image(data)
    if reason is not None:
        return Outcome(None, [rejection(path, reason)])
    return Outcome({"image": data, "label": label, **name_fields(name)})


def pack_imagenet_split(
    src: Path, target_data_dir: Path, split: str, *, workers: int = 0, strict: bool = False,
    extra_meta: dict[str, Any] | None = None, on_item: Any = None, request: PackRequest | None = None,
) -> tuple[PackSummary, int]:
    """Pack one split of a class-per-folder tree into ``target/<split>_lmdb``.

    `request` gives the read limits and ``follow_symlinks`` (the defaults without one). Returns
    the summary and the number of ignored (non-image) files.
    """
    folder = split_folder(src, split)
    source = SourceReader.for_folder(folder, request)
    listing = list_images(folder, source.follow_symlinks)
    digest = pack_fingerprint("imagenet", FORMAT_REVISION, split, listing.classes, listing.signatures, extra_meta,
                         source.options())
    meta = {"source": "imagenet", **(extra_meta or {})}
    summary = run_pack(
        db=db_path(target_data_dir, split), kind="classification", split=split, classes=listing.classes,
        items=listing.items, read=functools.partial(read_item, source=source), source_fingerprint=digest,
        workers=workers, strict=strict, warnings=listing.empty, extra_meta=meta, description=f"pack {split}",
        on_item=on_item,
    )
    return summary, listing.ignored


def splits_to_pack(src: Path, split: str) -> list[str]:
    """`split` itself, or for ``all`` the train/val/test folders that exist under `src`."""
    if split != "all":
        return [split]
    found = [s for s in ("train", "val", "test") if (Path(src) / s).is_dir()]
    if not found:
        raise UsageError(f"--split all: no train, val or test folder in {src}; name the split with --split")
    return found


def run(request: PackRequest) -> PackResult:
    """`hat pack imagenet`: pack the requested split(s) of ``--src-data-dir``."""
    if request.src_data_dir is None:
        raise UsageError("`hat pack imagenet` needs --src-data-dir (the folder with <split>/<class>/<image>)")
    result = PackResult()
    for split in splits_to_pack(request.src_data_dir, request.split):
        summary, ignored = pack_imagenet_split(request.src_data_dir, request.target_data_dir, split,
                                               workers=request.workers, strict=request.strict, request=request)
        add_summary(result, summary)
        if ignored:
            result.notes.append(f"{split}: ignored {ignored} entries that are not {'/'.join(IMAGE_SUFFIXES)} files")
    return result
