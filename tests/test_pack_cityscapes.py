"""`hat pack cityscapes`: a small fake Cityscapes tree in the real layout, packed and read back.

What they pin: every label id maps to the train id of cityscapesScripts' table (written out here
again, independently of the packer's), the meta holds the 19 classes and their colours, records
keep the image bytes and open as a `SegmentationDataset` with the expected masks, and each bad
input (no labels, a mask of another size, an unknown label id, an RGB or 16-bit mask) is skipped and listed,
or with `--strict` stops the pack.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hatcli.data.datasets import SegmentationDataset
from hatcli.data.lmdb_format import open_packed, verify_packed
from hatcli.data.packers.cityscapes import pack_cityscapes_split, to_train_ids

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

W, H = 64, 32
TRAIN_ID = {  # cityscapesScripts labels.py, id -> trainId (255: ignoreInEval)
    **{i: 255 for i in range(7)}, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 12: 3, 13: 4, 14: 255, 15: 255, 16: 255,
    17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255,
    31: 16, 32: 17, 33: 18,
}
CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
PALETTE = [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153],
           [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
           [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32]]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _label_ids(seed: int, size: tuple[int, int] = (W, H)) -> np.ndarray:
    """A (height, width) uint8 mask holding every label id 0..33 (and more pixels of random ones)."""
    ids = np.random.default_rng(seed).integers(0, 34, size[0] * size[1], dtype=np.uint8)
    ids[:34] = np.arange(34)
    return ids.reshape(size[1], size[0])


def _add(src: Path, split: str, city: str, frame: int, label_ids: np.ndarray | None,
         image_size: tuple[int, int] = (W, H)) -> str:
    """Write one image (and its labelIds PNG unless None) in the Cityscapes layout; return its file_name."""
    stem = f"{city}_000000_{frame:06d}"
    pixels = np.random.default_rng(frame).integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8)
    image = src / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(_png(pixels))
    labels = src / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
    labels.parent.mkdir(parents=True, exist_ok=True)
    if label_ids is not None:
        labels.write_bytes(_png(label_ids))
    return f"{city}/{stem}_leftImg8bit.png"


def _good_tree(src: Path) -> dict[str, dict[str, np.ndarray]]:
    """train: 2 cities, 3 images; val: 1 image. Returns {split: {file_name: label ids}}."""
    masks: dict[str, dict[str, np.ndarray]] = {"train": {}, "val": {}}
    for split, city, frame in (("train", "bochum", 7), ("train", "aachen", 19), ("train", "aachen", 3),
                               ("val", "frankfurt", 5)):
        ids = _label_ids(frame)
        masks[split][_add(src, split, city, frame, ids)] = ids
    (src / "leftImg8bit" / "train" / "aachen" / "notes.txt").write_text("not an image")
    return masks


def test_every_label_id_maps_to_its_train_id() -> None:
    train_ids, reason = to_train_ids(np.arange(34, dtype=np.uint8).reshape(1, 34))
    assert reason is None
    assert train_ids.tolist() == [[TRAIN_ID[i] for i in range(34)]]
    assert to_train_ids(np.array([[7, 40]], dtype=np.uint8)) == (
        None, "label id 40 is not a Cityscapes label id (0..33)")
    assert to_train_ids(np.array([[34, 255, 7]], dtype=np.uint8))[1] == (
        "label ids 34, 255 are not Cityscapes label ids (0..33)")


def test_pack_all_writes_train_and_val_with_the_expected_masks(tmp_path: Path, hat) -> None:
    src = tmp_path / "src"
    masks = _good_tree(src)
    result = hat("pack", "cityscapes", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst", "--workers", "0")
    assert result.code == 0, result.err
    assert "ignored 1 entries" in result.out
    lookup = np.array([TRAIN_ID[i] for i in range(34)], dtype=np.uint8)
    for split, expected in masks.items():
        db = tmp_path / "dst" / f"{split}_lmdb"
        assert verify_packed(db, progress=False)["count"] == len(expected)
        ds = SegmentationDataset(db)
        assert ds.classes == CLASSES and ds.ignore_index == 255
        assert ds.meta["palette"] == PALETTE and ds.meta["source"] == "cityscapes"
        reader = open_packed(db)
        names = [reader[i]["file_name"] for i in range(len(reader))]
        assert names == sorted(expected)  # sorted listing: aachen before bochum, frames in order
        for index, name in enumerate(names):
            record = reader[index]
            assert record["image"] == (src / "leftImg8bit" / split / name).read_bytes()
            assert (record["image_id"], record["height"], record["width"]) == (index, H, W)
            image, target = ds[index]
            assert tuple(image.shape) == (3, H, W)
            assert np.array_equal(target["mask"].numpy(), lookup[expected[name]])
    assert not (tmp_path / "dst" / "test_lmdb").exists()


def test_bad_records_are_skipped_named_and_listed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _add(src, "train", "aachen", 1, _label_ids(1))
    _add(src, "train", "aachen", 2, None)  # no labels
    _add(src, "train", "aachen", 3, _label_ids(3, size=(W // 2, H)))  # mask of another size
    unknown = _label_ids(4)
    unknown[5, 6] = 40
    _add(src, "train", "bochum", 4, unknown)
    _add(src, "train", "bochum", 5, np.zeros((H, W, 3), dtype=np.uint8))  # a colour PNG, not label ids
    _add(src, "train", "bochum", 6, _label_ids(6).astype(np.uint16))  # 16-bit grey: refused
    orphan = src / "gtFine" / "train" / "bochum" / "bochum_000000_000009_gtFine_labelIds.png"
    orphan.write_bytes(_png(_label_ids(9)))
    summary, _ignored = pack_cityscapes_split(src, tmp_path / "dst", "train", workers=0)
    assert summary.count == 1 and summary.rejected == 5
    listed = {Path(r["source"]).name: r for r in map(json.loads, summary.rejected_file.read_text().splitlines())}
    assert set(listed) == {"aachen_000000_000002_leftImg8bit.png", "aachen_000000_000003_gtFine_labelIds.png",
                           "bochum_000000_000004_gtFine_labelIds.png", "bochum_000000_000005_gtFine_labelIds.png",
                           "bochum_000000_000006_gtFine_labelIds.png"}
    assert "no labelIds file" in listed["aachen_000000_000002_leftImg8bit.png"]["reason"]
    assert listed["aachen_000000_000003_gtFine_labelIds.png"]["reason"] == (
        "the labelIds mask is 32x32 (WxH) but its image is 64x32")
    assert listed["bochum_000000_000004_gtFine_labelIds.png"]["reason"] == (
        "label id 40 is not a Cityscapes label id (0..33)")
    assert "the mask is a RGB image" in listed["bochum_000000_000005_gtFine_labelIds.png"]["reason"]
    assert "the mask is a I;16 image" in listed["bochum_000000_000006_gtFine_labelIds.png"]["reason"]
    unknown_entry = listed["bochum_000000_000004_gtFine_labelIds.png"]
    assert unknown_entry["file_name"] == "bochum/bochum_000000_000004_leftImg8bit.png"
    # image ids are positions among all images of the split, rejected ones included
    assert [r["image_id"] for r in listed.values()] == [1, 2, 3, 4, 5]
    assert open_packed(tmp_path / "dst" / "train_lmdb")[0]["image_id"] == 0
    assert len(summary.warnings) == 1 and "1 labelIds file(s) have no _leftImg8bit.png image" in summary.warnings[0]


def test_strict_stops_at_the_first_bad_record_and_leaves_no_database(tmp_path: Path, hat) -> None:
    src = tmp_path / "src"
    _add(src, "val", "aachen", 1, _label_ids(1))
    unknown = _label_ids(2)
    unknown[0, 0] = 200
    _add(src, "val", "aachen", 2, unknown)
    result = hat("pack", "cityscapes", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst",
                 "--split", "val", "--strict", "--workers", "0")
    assert result.code == 1
    assert "aachen_000000_000002_gtFine_labelIds.png" in result.err and "label id 200" in result.err
    assert "--strict" in result.err
    assert not (tmp_path / "dst" / "val_lmdb").exists()
    assert not (tmp_path / "dst" / "val_lmdb.partial").exists()


def test_a_missing_split_folder_is_a_usage_error_naming_the_layout(tmp_path: Path, hat) -> None:
    src = tmp_path / "src"
    _add(src, "train", "aachen", 1, _label_ids(1))
    result = hat("pack", "cityscapes", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst", "--split", "val")
    assert result.code == 2
    assert str(src / "leftImg8bit" / "val") in result.err and "gtFine/<split>/<city>" in result.err


def test_test_split_packs_only_when_named_and_warns_of_placeholder_labels(tmp_path: Path, hat) -> None:
    src = tmp_path / "src"
    _add(src, "test", "berlin", 1, np.zeros((H, W), dtype=np.uint8))
    result = hat("pack", "cityscapes", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst")
    assert result.code == 2 and "--split test" in result.err
    result = hat("pack", "cityscapes", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst",
                 "--split", "test", "--strict", "--workers", "0")
    assert result.code == 0, result.err
    assert "placeholders" in result.err
    assert (SegmentationDataset(tmp_path / "dst" / "test_lmdb")[0][1]["mask"] == 255).all()
