"""`hat pack KIND`: raw images + labels -> LMDB; `hat pack verify PATH` checks a database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from hatcli.commands._options import JsonOpt, print_json
from hatcli.errors import UsageError
from hatcli.family import PackRequest, PackResult
from hatcli.progress import console, stdout

EXAMPLES = """
Examples:

  hat pack imagenet --src-data-dir ~/imagenet --target-data-dir data/imagenet --split val --workers 8

  hat pack coco --src-data-dir ~/coco --target-data-dir data/coco --split val

  hat pack voc --src-data-dir ~/VOCdevkit/VOC2012 --target-data-dir data/voc --split trainval

  hat pack voc --src-data-dir ~/VOCdevkit/VOC2012 --target-data-dir data/voc_seg --task segmentation

  hat pack cityscapes --src-data-dir ~/cityscapes --target-data-dir data/cityscapes   # leftImg8bit/ + gtFine/

  hat pack mnist --src-data-dir /usr/share/datasets/fashion-mnist --target-data-dir data/fmnist

  hat pack shapes --target-data-dir data/shapes --num-images 1200

  hat pack shapes --target-data-dir data/shapes_det --task detection

  hat pack shapes --target-data-dir data/shapes_seg --task segmentation

  hat pack verify data/shapes/val_lmdb
"""


def pack(
    kind: Annotated[str, typer.Argument(help="Packer name (see `hat plugins`), or `verify`.")],
    path: Annotated[Path | None, typer.Argument(help="With `verify`: the database to check.")] = None,
    target_data_dir: Annotated[Path | None, typer.Option(help="Folder that receives <split>_lmdb.")] = None,
    src_data_dir: Annotated[Path | None, typer.Option(help="Folder of the raw dataset.")] = None,
    split: Annotated[str, typer.Option(help="Split to pack: train, val, all (every split the source has), or the "
                                                 "source's own (voc: trainval, test).")] = "all",
    task: Annotated[str, typer.Option(help="classification, detection or segmentation (generated datasets; "
                                           "`voc`: detection or segmentation records).")] = "classification",
    num_images: Annotated[int | None, typer.Option(help="Images to generate (generated datasets).")] = None,
    image_size: Annotated[int, typer.Option(help="Image side in pixels (generated datasets).")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (generated datasets).")] = 0,
    workers: Annotated[int, typer.Option(
        help="Processes that read and validate images; -1: one per CPU core (up to 8) for large sources.")] = -1,
    strict: Annotated[bool, typer.Option(
        help="Stop (exit 1, no database written) at the first bad record instead of skipping it.")] = False,
    ann_file: Annotated[Path | None, typer.Option(help="COCO annotation file, if not the default.")] = None,
    max_bytes: Annotated[int, typer.Option(
        help="Reject source files larger than this many bytes (checked before reading).")] = PackRequest.max_bytes,
    max_pixels: Annotated[int, typer.Option(
        help="Reject images with more pixels (checked from the header, before decoding).")] = PackRequest.max_pixels,
    follow_symlinks: Annotated[bool, typer.Option(
        "--follow-symlinks",
        help="Read images and class folders that symlinks place outside the source folder (refused by default).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Pack a dataset into LMDB records (msgpack), or verify a packed database.

    Writes TARGET/<split>_lmdb. Bad records are skipped and listed in <split>_lmdb.rejected.jsonl.
    Only regular files inside the source folder are read, each within --max-bytes and --max-pixels.

    An interrupted pack (Ctrl-C, kill) continues where it stopped when the same command is run again.
    """
    if kind == "verify":
        from hatcli.data.lmdb_format import verify_packed

        if path is None:
            raise UsageError("`hat pack verify` needs the database path, e.g. hat pack verify data/shapes/val_lmdb")
        report = verify_packed(path)
        print_json(report) if json_out else stdout.print(_verify_summary(report), highlight=False, soft_wrap=True)
        return
    from hatcli.data.packing import check_split_name
    from hatcli.plugins import packers

    check_split_name(split)
    packer = packers().get(kind)
    if target_data_dir is None:
        raise UsageError(f"`hat pack {kind}` needs --target-data-dir DIR")
    if task not in ("classification", "detection", "segmentation"):
        raise UsageError(f"--task must be classification, detection or segmentation, not `{task}`")
    request = PackRequest(kind=kind, target_data_dir=target_data_dir, src_data_dir=src_data_dir, split=split,
                          task=task, num_images=num_images, image_size=image_size, seed=seed, workers=workers,
                          strict=strict, ann_file=ann_file, max_bytes=max_bytes, max_pixels=max_pixels,
                          follow_symlinks=follow_symlinks)  # type: ignore[arg-type]
    result = packer.run(request)
    if json_out:
        print_json({"databases": result.databases, "rejected": result.rejected, "notes": result.notes,
                    "warnings": result.warnings})
        return
    for db, count in result.databases.items():
        stdout.print(f"[green]packed[/] {count} records -> {db}")
    for note in result.notes:
        stdout.print(note)
    for warning in result.warnings:
        console.print(f"[yellow]warning[/]: {escape(warning)}", soft_wrap=True, highlight=False)
    if result.rejected:
        _show_rejections(result)


def _verify_summary(report: dict[str, Any]) -> str:
    """`hat pack verify`'s result for a reader: what the database holds and that its checksum matches."""
    classes = report.get("classes")
    of_classes = f" of {classes} classes" if classes is not None else ""
    return (f"[green]ok[/]: {escape(report['path'])}: {report['count']:,} {report['kind']} records{of_classes}, "
            f"split `{escape(report['split'])}`; checksum sha256 {report['records_sha256']} matches")


def _show_rejections(result: PackResult, shown: int = 5) -> None:
    """Print the first few rejections of each database (all are in its .rejected.jsonl)."""
    import json

    from hatcli.data.packing import rejected_path

    for db in result.databases:
        listed = rejected_path(Path(db))
        if not listed.exists():
            continue
        lines = listed.read_text(encoding="utf-8").splitlines()
        console.print(f"[yellow]{len(lines)} rejected[/] while packing {db} (all listed in {listed}):")
        for line in lines[:shown]:
            entry = json.loads(line)
            console.print(f"  {entry['source']}: {entry['reason']}", soft_wrap=True, markup=False, highlight=False)
        if len(lines) > shown:
            console.print(f"  ... and {len(lines) - shown} more")


def register(app: typer.Typer) -> None:
    """Add `hat pack` to the root app."""
    app.command("pack", epilog=EXAMPLES)(pack)
