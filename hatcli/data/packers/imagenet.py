"""`hat pack imagenet`: a class-per-folder image tree (ImageNet, or any folder of classes).

Source layout: ``SRC/<split>/<class>/<image>`` (or ``SRC/<class>/<image>`` when SRC itself is
the split folder). Classes are the sub-folder names in sorted order (label = position); images
are taken in sorted order and stored as their encoded bytes, never re-encoded. Files whose
suffix is not an image suffix are ignored (and counted); image files that cannot be read or
decoded are rejected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hatcli.data.packing import (
    Outcome,
    PackSummary,
    add_summary,
    check_image,
    db_path,
    file_signature,
    fingerprint,
    read_file,
    rejection,
    run_pack,
)
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


def list_images(folder: Path) -> tuple[list[str], list[Item], list[list[Any]], int]:
    """Classes, items, their file signatures, and the number of ignored non-image files."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class folders (expected {folder}/<class>/<image>.jpg)")
    items: list[Item] = []
    signatures: list[list[Any]] = []
    ignored = 0
    for label, name in enumerate(classes):
        entries = sorted(os.scandir(folder / name), key=lambda e: e.name)
        for entry in entries:
            if not entry.name.lower().endswith(IMAGE_SUFFIXES) or entry.is_dir():
                ignored += 1
                continue
            items.append((entry.path, label, f"{name}/{entry.name}"))
            signatures.append([f"{name}/{entry.name}", *file_signature(Path(entry.path))])
    if not items:
        raise DataError(f"{folder} has class folders but no {'/'.join(IMAGE_SUFFIXES)} images in them")
    return classes, items, signatures, ignored


def read_item(item: Item) -> Outcome:
    """Read and validate one image file (runs in the pack workers)."""
    path, label, name = item
    data, reason = read_file(path)
    if data is not None:
        reason, _size = check_image(data)
    if reason is not None:
        return Outcome(None, [rejection(path, reason)])
    return Outcome({"image": data, "label": label, "name": name})


def pack_imagenet_split(
    src: Path, target_data_dir: Path, split: str, *, workers: int = 0, strict: bool = False,
    extra_meta: dict[str, Any] | None = None, on_item: Any = None,
) -> tuple[PackSummary, int]:
    """Pack one split of a class-per-folder tree into ``target/<split>_lmdb``.

    Returns the summary and the number of ignored (non-image) files.
    """
    folder = split_folder(src, split)
    classes, items, signatures, ignored = list_images(folder)
    digest = fingerprint("imagenet", FORMAT_REVISION, split, classes, signatures, extra_meta)
    meta = {"source": "imagenet", **(extra_meta or {})}
    summary = run_pack(
        db=db_path(target_data_dir, split), kind="classification", split=split, classes=classes,
        items=items, read=read_item, source_fingerprint=digest, workers=workers, strict=strict,
        extra_meta=meta, description=f"pack {split}", on_item=on_item,
    )
    return summary, ignored


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
                                               workers=request.workers, strict=request.strict)
        add_summary(result, summary)
        if ignored:
            result.notes.append(f"{split}: ignored {ignored} entries that are not {'/'.join(IMAGE_SUFFIXES)} files")
    return result
