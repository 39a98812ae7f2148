"""`hat pack mnist`: the idx files of MNIST or Fashion-MNIST (``*.gz`` or uncompressed).

Source layout: ``SRC/train-images-idx3-ubyte.gz``, ``SRC/train-labels-idx1-ubyte.gz`` and the
``t10k-*`` pair for the test set, which packs as split ``val`` (or ``test``). Each 28x28 grey
image is stored as a lossless PNG (the readers decode encoded bytes; PNG keeps every pixel).
Class names are the digits, or the Fashion-MNIST clothing names when the source folder's name
contains "fashion".
"""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path
from typing import Any

import numpy as np

from hatcli.data.packing import Outcome, PackSummary, add_summary, db_path, file_signature, pack_fingerprint, run_pack
from hatcli.errors import DataError, UsageError
from hatcli.family import PackRequest, PackResult

DIGITS = [str(d) for d in range(10)]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILE_PREFIX = {"train": "train", "val": "t10k", "test": "t10k"}
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
FORMAT_REVISION = 1

Item = tuple[int, bytes, int, int, int]  # index, pixels, label, rows, cols


def _find(src: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (src / name).is_file():
            return src / name
    raise UsageError(f"no {stem}.gz (or {stem}) in {src}; expected the MNIST idx files there")


def read_idx(path: Path, magic: int) -> tuple[tuple[int, ...], bytes]:
    """Dimensions and payload of an idx file; DataError naming the file when it is malformed."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(raw) < 8 or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path} is not an idx file of the expected kind (magic number {magic:#010x})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: the idx header is cut short")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes but its header promises {expected} (truncated?)")
    return dims, raw[header:]


def list_mnist(src: Path, split: str) -> tuple[list[str], list[Item], list[Any]]:
    """Class names, one item per image, and the source files' signatures."""
    if split not in FILE_PREFIX:
        raise UsageError(f"unknown split `{split}` for mnist: use train, val (the t10k files) or test")
    prefix = FILE_PREFIX[split]
    image_file, label_file = _find(src, f"{prefix}-images-idx3-ubyte"), _find(src, f"{prefix}-labels-idx1-ubyte")
    (n, rows, cols), pixels = read_idx(image_file, IMAGES_MAGIC)
    (n_labels,), labels = read_idx(label_file, LABELS_MAGIC)
    if n != n_labels:
        raise DataError(f"{image_file} holds {n} images but {label_file} holds {n_labels} labels")
    classes = FASHION if "fashion" in Path(src).resolve().name.lower() else DIGITS
    if labels and max(labels) >= len(classes):
        raise DataError(f"{label_file}: label {max(labels)} is outside 0..{len(classes) - 1}")
    size = rows * cols
    items = [(i, pixels[i * size:(i + 1) * size], labels[i], rows, cols) for i in range(n)]
    return classes, items, [file_signature(image_file), file_signature(label_file)]


def read_item(item: Item) -> Outcome:
    """Encode one grey image as PNG (runs in the pack workers)."""
    from PIL import Image

    index, pixels, label, rows, cols = item
    buffer = io.BytesIO()
    Image.frombytes("L", (cols, rows), pixels).save(buffer, format="PNG")
    return Outcome({"image": buffer.getvalue(), "label": int(label), "name": f"{index:05d}"})


def pack_mnist_split(
    src: Path, target_data_dir: Path, split: str, *, workers: int = 0, strict: bool = False, on_item: Any = None,
) -> PackSummary:
    """Pack one split of the MNIST idx files into ``target/<split>_lmdb``."""
    classes, items, signatures = list_mnist(Path(src), split)
    digest = pack_fingerprint("mnist", FORMAT_REVISION, split, classes, signatures)
    return run_pack(
        db=db_path(target_data_dir, split), kind="classification", split=split, classes=classes, items=items,
        read=read_item, source_fingerprint=digest, workers=workers, strict=strict,
        extra_meta={"source": "mnist"}, description=f"pack {split}", on_item=on_item,
    )


def run(request: PackRequest) -> PackResult:
    """`hat pack mnist`: pack train and val (``all``), or the one split asked for."""
    if request.src_data_dir is None:
        raise UsageError("`hat pack mnist` needs --src-data-dir (the folder with the idx .gz files)")
    result = PackResult()
    for split in (["train", "val"] if request.split == "all" else [request.split]):
        add_summary(result, pack_mnist_split(request.src_data_dir, request.target_data_dir, split,
                                             workers=request.workers, strict=request.strict))
    return result
