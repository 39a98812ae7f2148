"""No item is ever lost: file names that are not UTF-8, and a pack that fails halfway.

What they pin: an image whose file name is not valid UTF-8 is packed with its name kept
losslessly (`name_bytes`, the file system's bytes, beside a readable `name`); the writer counts an
item as done only once its record is in the batch it commits, so a pack that fails on one item
(an exception in the middle of a batch) and is run again ends with exactly the records and the
rejections of a pack that never failed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hatcli.data.lmdb_format import open_packed
from hatcli.data.lmdb_writer import PROGRESS_FILE, LmdbWriter
from hatcli.data.packers.imagenet import pack_imagenet_split
from hatcli.errors import DataError
from test_packers import _class_tree, _db_items, _image_bytes

RAW_NAME = b"caf\xe9-latin1.jpg"  # "café" in Latin-1: not valid UTF-8
RAW_CLASS = b"\xffclass"


def _tree_with_raw_names(root: Path) -> Path:
    """The class tree plus an image and a whole class folder whose names are not UTF-8."""
    src = _class_tree(root)
    with open(os.fsencode(src / "train" / "cat") + b"/" + RAW_NAME, "wb") as handle:
        handle.write(_image_bytes(77))
    os.mkdir(os.fsencode(src / "train") + b"/" + RAW_CLASS)
    with open(os.fsencode(src / "train") + b"/" + RAW_CLASS + b"/01.jpg", "wb") as handle:
        handle.write(_image_bytes(78))
    return src


def test_a_file_name_that_is_not_utf8_is_packed_with_its_bytes_kept(tmp_path: Path) -> None:
    src = _tree_with_raw_names(tmp_path / "src")
    summary, _ = pack_imagenet_split(src, tmp_path / "dst", "train", workers=0)
    assert summary.count == 20 and summary.rejected == 0
    reader = open_packed(tmp_path / "dst" / "train_lmdb")
    records = [reader[i] for i in range(len(reader))]
    raw = [r for r in records if "name_bytes" in r]
    assert sorted(r["name_bytes"] for r in raw) == sorted([RAW_CLASS + b"/01.jpg", b"cat/" + RAW_NAME])
    for record in raw:  # the readable name shows the undecodable bytes as \xNN escapes
        assert "\\x" in record["name"]
        with open(os.fsencode(src / "train") + b"/" + record["name_bytes"], "rb") as handle:
            assert record["image"] == handle.read()
    assert all("name_bytes" not in r for r in records if r not in raw)  # UTF-8 names are stored as before
    assert "\\xffclass" in reader.meta["classes"]


def test_packing_raw_names_twice_gives_the_same_database(tmp_path: Path) -> None:
    src = _tree_with_raw_names(tmp_path / "src")
    pack_imagenet_split(src, tmp_path / "a", "train", workers=0)
    pack_imagenet_split(src, tmp_path / "b", "train", workers=2)
    assert _db_items(tmp_path / "a" / "train_lmdb") == _db_items(tmp_path / "b" / "train_lmdb")


def _records(n: int) -> list[dict]:
    return [{"image": b"x" * (i + 1), "label": i % 3, "name": f"{i:03d}.jpg"} for i in range(n)]


def _write(path: Path, records: list[dict | None], fingerprint: str = "fp") -> LmdbWriter:
    with LmdbWriter(path, "classification", "train", ["a", "b", "c"], batch_records=4,
                    fingerprint=fingerprint) as writer:
        for i in range(writer.items_done, len(records)):  # a resumed write continues where it stopped
            record = records[i]
            writer.consume(record, [] if record is not None else [{"source": f"{i}", "reason": "bad"}])
    return writer


def test_an_item_whose_record_cannot_be_written_is_not_counted_as_done(tmp_path: Path) -> None:
    good = _records(10)
    good[6] = None  # one rejected item, so the rejections must line up too
    whole = _write(tmp_path / "whole", good)
    broken = list(good)
    broken[5] = {**good[5], "name": object()}  # msgpack cannot store it: fails mid-batch
    with pytest.raises(DataError, match="record 5"):
        _write(tmp_path / "cut", broken)
    progress = json.loads((tmp_path / "cut.partial" / PROGRESS_FILE).read_text())
    assert progress["items_done"] == 5 and progress["count"] == 5  # item 5 is not done
    resumed = _write(tmp_path / "cut", good)
    assert resumed.resumed_items == 5
    assert _db_items(tmp_path / "cut") == _db_items(tmp_path / "whole")
    assert resumed.rejections == whole.rejections


class _FailAt:
    """An `on_item` hook that raises an unexpected error (not Ctrl-C) once `n` items are done."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, items_done: int) -> None:
        if items_done == self.n:
            raise RuntimeError("disk on fire")


def test_a_pack_that_failed_mid_batch_resumes_to_the_same_records_and_rejects(tmp_path: Path) -> None:
    src = _tree_with_raw_names(tmp_path / "src")
    (src / "train" / "dog" / "bad.jpg").write_text("not an image")
    whole, _ = pack_imagenet_split(src, tmp_path / "whole", "train", workers=0)
    with pytest.raises(RuntimeError, match="disk on fire"):
        pack_imagenet_split(src, tmp_path / "cut", "train", workers=0, on_item=_FailAt(11))
    cut, _ = pack_imagenet_split(src, tmp_path / "cut", "train", workers=0)
    assert cut.resumed_items == 11 and cut.count == whole.count == 20
    assert _db_items(tmp_path / "cut" / "train_lmdb") == _db_items(tmp_path / "whole" / "train_lmdb")
    assert cut.rejected_file.read_text() == whole.rejected_file.read_text()
