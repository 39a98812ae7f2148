"""`hat pack coco` checks the type of every json field it reads, one annotation at a time.

What they pin: an annotation (or image entry) with a field of the wrong type — a list where an
id belongs, a text `area`, a NaN or infinite box, an `iscrowd` that is neither 0/1 nor a bool —
is rejected alone, named by annotation file, entry and id with the reason; the rest is packed.
Nothing of the kind aborts the pack with a bare TypeError or ValueError.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hatcli.data.lmdb_format import open_packed
from hatcli.errors import DataError
from test_packers import _coco, _coco_source, _pack_coco, _write_coco

GOOD = {"image_id": 102, "category_id": 5, "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0, "iscrowd": 0}

BAD_ANNOTATIONS = [
    ({"id": [70]}, "annotation `id` must be an integer, got [70]"),
    ({"id": 71, "image_id": [102]}, "annotation `image_id` must be an integer, got [102]"),
    ({"id": 72, "category_id": [5]}, "annotation `category_id` must be an integer, got [5]"),
    ({"id": 73, "category_id": True}, "annotation `category_id` must be an integer, got True"),
    ({"id": 74, "area": "25"}, "annotation `area` must be a non-negative number, got '25'"),
    ({"id": 75, "area": float("inf")}, "annotation `area` must be a non-negative number, got inf"),
    ({"id": 76, "bbox": [1.0, 1.0, float("nan"), 5.0]}, "bbox must be [x, y, width, height] of finite numbers"),
    ({"id": 77, "bbox": [1.0, float("-inf"), 5.0, 5.0]}, "bbox must be [x, y, width, height] of finite numbers"),
    ({"id": 78, "iscrowd": "no"}, "annotation `iscrowd` must be 0, 1, true or false, got 'no'"),
    ({"id": 79, "iscrowd": 2}, "annotation `iscrowd` must be 0, 1, true or false, got 2"),
    ({"id": 80, "iscrowd": 1.0}, "annotation `iscrowd` must be 0, 1, true or false, got 1.0"),
    ({"id": 2**70}, "annotation `id` must be an integer"),
]


def _with_annotations(src: Path, extra: list[dict]) -> None:
    coco = _coco(src)
    coco["annotations"] += extra
    _write_coco(src, coco)  # json.dumps writes NaN and Infinity, which json.loads (and COCO tools) accept


def test_each_mistyped_annotation_is_rejected_alone_with_file_id_and_reason(tmp_path: Path) -> None:
    src = _coco_source(tmp_path / "src")
    _with_annotations(src, [{**GOOD, **change} for change, _ in BAD_ANNOTATIONS] + [{**GOOD, "id": 81, "iscrowd": True}])
    summary = _pack_coco(src, tmp_path / "dst")
    assert summary.count == 4
    listed = [json.loads(line) for line in summary.rejected_file.read_text().splitlines()]
    assert len(listed) == len(BAD_ANNOTATIONS)
    for entry, (change, reason) in zip(listed, BAD_ANNOTATIONS):
        assert reason in entry["reason"], entry
        assert "instances_val2017.json#annotations[" in entry["source"]
        assert entry["ann_id"] == change["id"]
    record = open_packed(tmp_path / "dst" / "val_lmdb")[2]
    assert record["ann_ids"] == [21, 81] and record["iscrowd"] == [0, 1]  # `true` is a crowd, stored as 1


BAD_IMAGES = [
    ({"id": [300], "file_name": "000.jpg"}, "image entry needs an integer `id`, got [300]"),
    ({"id": 301, "file_name": ["000.jpg"]}, "file_name ['000.jpg'] is not a relative path"),
    ({"id": 302, "file_name": "000.jpg", "width": "40"}, "image `width` must be a positive integer, got '40'"),
    ({"id": 303, "file_name": "000.jpg", "height": 30.0}, "image `height` must be a positive integer, got 30.0"),
    ({"id": 304, "file_name": "000.jpg", "height": True}, "image `height` must be a positive integer, got True"),
    ({"id": 305, "file_name": "bad\udcffname.jpg"}, "is not a relative path"),
]


def test_each_mistyped_image_entry_is_rejected_alone(tmp_path: Path) -> None:
    src = _coco_source(tmp_path / "src")
    coco = _coco(src)
    coco["images"] += [{"width": 40, "height": 30, **change} for change, _ in BAD_IMAGES]
    _write_coco(src, coco)
    summary = _pack_coco(src, tmp_path / "dst")
    assert summary.count == 4
    listed = [json.loads(line) for line in summary.rejected_file.read_text().splitlines()]
    for entry, (_, reason) in zip(listed, BAD_IMAGES, strict=True):
        assert reason in entry["reason"] and "instances_val2017.json#images[" in entry["source"]


@pytest.mark.parametrize("category", [
    {"id": [9], "name": "kite"}, {"id": True, "name": "kite"}, {"id": 9, "name": ["kite"]}, {"id": 9, "name": 3},
])
def test_a_mistyped_category_names_the_file_and_the_entry(tmp_path: Path, category: dict) -> None:
    src = _coco_source(tmp_path / "src")
    coco = _coco(src)
    coco["categories"][0] = category
    _write_coco(src, coco)
    with pytest.raises(DataError, match=r"instances_val2017.json: categories\[0\] needs an integer `id`, a text `name`"):
        _pack_coco(src, tmp_path / "dst")
