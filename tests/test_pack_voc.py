"""`hat pack voc`: Pascal VOC trees built here in the real layout, packed as detection and segmentation.

What they pin: VOC's 1-based inclusive ``<bndbox>`` becomes the COCO box ``[xmin - 1, ymin - 1,
xmax - xmin + 1, ymax - ymin + 1]`` exactly; labels follow the devkit's class order; the
``difficult`` and ``truncated`` flags are kept (a missing tag is 0); image ids come from the VOC
ids; palette masks are read as class indices; every kind of bad input is rejected, named and
listed (a bad box alone, a bad image or mask with its record), or with ``--strict`` stops the pack;
and the packed data opens as a DetectionDataset and a SegmentationDataset.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hatcli.data.datasets import DetectionDataset, SegmentationDataset, decode_mask, open_dataset
from hatcli.data.lmdb_format import open_packed, verify_packed
from hatcli.data.packers.voc import SEGMENTATION_CLASSES, VOC_CLASSES, image_ids, pack_voc_split
from hatcli.data.palette import voc_colormap

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

WIDTH, HEIGHT = 40, 30
IDS = ("2008_000001", "2008_000002", "2008_000003", "2008_000004")


def _jpeg(seed: int, size: tuple[int, int] = (WIDTH, HEIGHT)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _object(name: str, box: tuple, difficult: str | None = "0", truncated: str | None = "0") -> str:
    """One ``<object>`` as VOC writes it (a tag given as None is left out)."""
    flags = "".join(f"\t\t<{tag}>{value}</{tag}>\n" for tag, value in (("truncated", truncated),
                                                                        ("difficult", difficult)) if value is not None)
    corners = "".join(f"\t\t\t<{tag}>{value}</{tag}>\n" for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return (f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n{flags}"
            f"\t\t<bndbox>\n{corners}\t\t</bndbox>\n\t</object>\n")


def _xml(voc_id: str, objects: list[str], size: tuple[int, int] = (WIDTH, HEIGHT)) -> str:
    return (f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{voc_id}.jpg</filename>\n"
            f"\t<source>\n\t\t<database>The VOC2008 Database</database>\n\t\t<annotation>PASCAL VOC2008</annotation>\n"
            f"\t\t<image>flickr</image>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>{size[1]}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>1</segmented>\n{''.join(objects)}</annotation>\n")


def _palette_png(indices: np.ndarray) -> bytes:
    """A mask as VOC stores it: a palette ("P") PNG whose pixel values are the class indices."""
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette([v for rgb in voc_colormap(256) for v in rgb])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _mask(seed: int) -> np.ndarray:
    """Class indices 0..20 with a 255 border, as VOC's masks have."""
    indices = np.random.default_rng(seed).integers(0, 21, (HEIGHT, WIDTH), dtype=np.uint8)
    indices[0, :] = 255
    return indices


OBJECTS = {
    # the whole image (1..W, 1..H), a person marked difficult, a dog with no flags at all
    "2008_000001": [_object("aeroplane", (1, 1, WIDTH, HEIGHT), truncated="1"),
                    _object("person", (5, 6, 14, 20), difficult="1"),
                    _object("dog", ("3.0", "4.0", "12.0", "9.0"), difficult=None, truncated=None)],
    "2008_000002": [_object("tvmonitor", (10, 10, 10, 10))],  # a one-pixel box
    "2008_000003": [_object("cat", (2, 2, 20, 20))],
    "2008_000004": [_object("bus", (2, 2, 20, 20)), _object("car", (1, 1, 5, 5))],
}


def voc_tree(root: Path) -> Path:
    """root/VOCdevkit/VOC2012 in the VOC layout: 4 images, train = the first 2, val = the last 2;
    segmentation lists train = 1 and 2, val = 3 (with masks for those three)."""
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main", "ImageSets/Segmentation", "SegmentationClass"):
        (voc / folder).mkdir(parents=True)
    for seed, voc_id in enumerate(IDS):
        (voc / "JPEGImages" / f"{voc_id}.jpg").write_bytes(_jpeg(seed))
        (voc / "Annotations" / f"{voc_id}.xml").write_text(_xml(voc_id, OBJECTS[voc_id]))
    for seed, voc_id in enumerate(IDS[:3]):
        (voc / "SegmentationClass" / f"{voc_id}.png").write_bytes(_palette_png(_mask(seed)))
    _write_list(voc / "ImageSets/Main/train.txt", IDS[:2])
    _write_list(voc / "ImageSets/Main/val.txt", IDS[2:])
    _write_list(voc / "ImageSets/Segmentation/train.txt", IDS[:2])
    _write_list(voc / "ImageSets/Segmentation/val.txt", IDS[2:3])
    return voc


def _write_list(path: Path, ids) -> None:
    path.write_text("".join(f"{voc_id}\n" for voc_id in ids))


def _rejections(db: Path) -> list[dict]:
    listed = db.with_name(db.name + ".rejected.jsonl")
    return [json.loads(line) for line in listed.read_text().splitlines()] if listed.exists() else []


# -- detection ----------------------------------------------------------------------------------


def test_detection_records_convert_boxes_once_and_keep_the_flags(tmp_path: Path, hat) -> None:
    voc = voc_tree(tmp_path / "src")
    result = hat("pack", "voc", "--src-data-dir", tmp_path / "src", "--target-data-dir", tmp_path / "dst",
                 "--split", "train", "--workers", "0", "--json")
    assert result.code == 0, result.err
    assert result.json()["databases"] == {str(tmp_path / "dst" / "train_lmdb"): 2}
    assert f"packing the VOC folder {voc}" in result.json()["notes"]  # found VOCdevkit/VOC2012 in src
    reader = open_packed(tmp_path / "dst" / "train_lmdb")
    assert reader.meta["kind"] == "detection" and reader.meta["source"] == "voc"
    assert reader.meta["classes"] == list(VOC_CLASSES) and reader.meta["category_ids"] == list(range(1, 21))
    assert reader.meta["coco_categories"][14] == {"id": 15, "name": "person", "supercategory": ""}
    assert reader.meta["image_id_rule"] == "number"
    record = reader[0]
    assert record["image"] == (voc / "JPEGImages" / "2008_000001.jpg").read_bytes()
    assert (record["image_id"], record["file_name"], record["height"], record["width"]) == (
        2008000001, "2008_000001.jpg", HEIGHT, WIDTH)
    assert record["boxes"] == [[0.0, 0.0, WIDTH, HEIGHT], [4.0, 5.0, 10.0, 15.0], [2.0, 3.0, 10.0, 6.0]]
    assert record["labels"] == [0, 14, 11] and record["category_ids"] == [1, 15, 12]
    assert record["difficult"] == [0, 1, 0] and record["truncated"] == [1, 0, 0] and record["iscrowd"] == [0, 0, 0]
    assert record["area"] == [WIDTH * HEIGHT, 150.0, 60.0]
    assert reader[1]["boxes"] == [[9.0, 9.0, 1.0, 1.0]] and reader[1]["labels"] == [19]
    assert verify_packed(tmp_path / "dst" / "train_lmdb", progress=False)["ok"]


def test_the_packed_detection_data_opens_without_the_difficult_box(tmp_path: Path) -> None:
    voc = voc_tree(tmp_path / "src")
    pack_voc_split(voc, tmp_path / "dst", "train")
    dataset = open_dataset(tmp_path / "dst" / "train_lmdb")
    assert isinstance(dataset, DetectionDataset)
    image, target = dataset[0]
    assert tuple(image.shape) == (3, HEIGHT, WIDTH)
    assert target["labels"].tolist() == [0, 11]  # the difficult person is not a training target
    assert target["boxes"].tolist() == [[0.0, 0.0, 40.0, 30.0], [2.0, 3.0, 12.0, 9.0]]


def test_split_all_packs_train_and_val_and_trainval_by_name(tmp_path: Path, hat) -> None:
    voc = voc_tree(tmp_path / "src")
    result = hat("pack", "voc", "--src-data-dir", voc, "--target-data-dir", tmp_path / "dst", "--json")
    assert result.code == 0, result.err
    assert result.json()["databases"] == {str(tmp_path / "dst" / "train_lmdb"): 2, str(tmp_path / "dst" / "val_lmdb"): 2}
    _write_list(voc / "ImageSets/Main/trainval.txt", IDS)
    summary, _ = pack_voc_split(voc, tmp_path / "dst", "trainval")
    assert summary.count == 4 and summary.rejected == 0


def test_ids_that_are_not_numbers_get_their_position() -> None:
    assert image_ids(["2008_000123", "000005"]) == ([2008000123, 5], "number")
    assert image_ids(["a", "b", "2008_000001"]) == ([0, 1, 2], "position")
    assert image_ids(["2008_000123", "2008000123"]) == ([0, 1], "position")  # the same number twice


def _break_detection(voc: Path) -> None:
    """Every kind of bad detection input, on images listed in train."""
    bad = {
        "2008_000101": None,  # listed, but no XML
        "2008_000102": "<annotation><size><width>40</width>",  # not XML
        "2008_000103": _xml("2008_000103", [_object("cat", (2, 2, 20, 20))], size=(50, 30)),  # wrong size
        "2008_000104": _xml("2008_000104", [
            _object("cat", (2, 2, 20, 20)),  # good: survives
            _object("zebra", (2, 2, 20, 20)),
            _object("dog", (20, 2, 10, 20)),  # xmax < xmin
            _object("dog", (2, 2, 42, 20)),  # x1 = 42 > 40 + 1
            _object("dog", (2, 2, "twenty", 20)),
            _object("dog", (2, 2, 20, 20), difficult="yes"),
        ]),
    }
    for seed, (voc_id, xml) in enumerate(bad.items()):
        (voc / "JPEGImages" / f"{voc_id}.jpg").write_bytes(_jpeg(10 + seed))
        if xml is not None:
            (voc / "Annotations" / f"{voc_id}.xml").write_text(xml)
    (voc / "Annotations" / "2008_000105.xml").write_text(_xml("2008_000105", []))  # no image
    _write_list(voc / "ImageSets/Main/train.txt", [*IDS[:2], *bad, "2008_000105"])


DETECTION_PROBLEMS = {
    "Annotations/2008_000101.xml": "listed id 2008_000101 has no readable annotation file (cannot read the file",
    "Annotations/2008_000102.xml": "unparseable XML",
    "JPEGImages/2008_000103.jpg": "the image is 40x30 (WxH) but 2008_000103.xml says it is 50x30",
    "Annotations/2008_000104.xml#object[1]": "unknown class name 'zebra': the VOC classes are aeroplane, bicycle,",
    "Annotations/2008_000104.xml#object[2]": "has xmax < xmin",
    "Annotations/2008_000104.xml#object[3]": "lies outside its 40x30 image",
    "Annotations/2008_000104.xml#object[4]": "<bndbox><xmax> must be a number, got 'twenty'",
    "Annotations/2008_000104.xml#object[5]": "<difficult> must be 0 or 1, got 'yes'",
    "JPEGImages/2008_000105.jpg": "cannot read the file",
}


def test_bad_detection_input_is_rejected_named_and_listed(tmp_path: Path) -> None:
    voc = voc_tree(tmp_path / "src")
    _break_detection(voc)
    summary, _ = pack_voc_split(voc, tmp_path / "dst", "train", workers=2)
    assert summary.count == 3 and summary.rejected == len(DETECTION_PROBLEMS)
    listed = {Path(entry["source"]).relative_to(voc).as_posix(): entry for entry in _rejections(summary.path)}
    assert listed.keys() == DETECTION_PROBLEMS.keys()
    for source, reason in DETECTION_PROBLEMS.items():
        assert reason in listed[source]["reason"], (source, listed[source])
    assert listed["Annotations/2008_000104.xml#object[1]"]["voc_id"] == "2008_000104"
    kept = open_packed(summary.path)[2]
    assert kept["image_id"] == 2008000104 and kept["labels"] == [7] and kept["boxes"] == [[1.0, 1.0, 19.0, 19.0]]


def test_strict_stops_at_the_first_bad_record_and_leaves_no_database(tmp_path: Path, hat) -> None:
    voc = voc_tree(tmp_path / "src")
    _break_detection(voc)
    result = hat("pack", "voc", "--src-data-dir", voc, "--target-data-dir", tmp_path / "dst", "--split", "train",
                 "--strict", "--workers", "0")
    assert result.code == 1 and "2008_000101.xml" in result.err and "--strict" in result.err
    assert not (tmp_path / "dst" / "train_lmdb").exists() and not (tmp_path / "dst" / "train_lmdb.partial").exists()


def test_a_folder_that_is_not_voc_or_a_missing_split_is_a_usage_error(tmp_path: Path, hat) -> None:
    (tmp_path / "empty").mkdir()
    result = hat("pack", "voc", "--src-data-dir", tmp_path / "empty", "--target-data-dir", tmp_path / "dst")
    assert result.code == 2 and "is not a Pascal VOC folder" in result.err and "JPEGImages/" in result.err
    voc = voc_tree(tmp_path / "src")
    result = hat("pack", "voc", "--src-data-dir", voc, "--target-data-dir", tmp_path / "dst", "--split", "test")
    assert result.code == 2 and str(voc / "ImageSets" / "Main" / "test.txt") in result.err
    from hatcli.plugins import packers

    assert "SRC/{JPEGImages,Annotations,ImageSets/Main,SegmentationClass}" in packers().get("voc").description


# -- segmentation -------------------------------------------------------------------------------


def test_segmentation_records_keep_the_class_indices_of_the_palette_masks(tmp_path: Path, hat) -> None:
    voc_tree(tmp_path / "src")
    result = hat("pack", "voc", "--src-data-dir", tmp_path / "src", "--target-data-dir", tmp_path / "dst",
                 "--task", "segmentation", "--workers", "0")
    assert result.code == 0, result.err
    reader = open_packed(tmp_path / "dst" / "train_lmdb")
    meta = reader.meta
    assert meta["kind"] == "segmentation" and meta["classes"] == list(SEGMENTATION_CLASSES) and len(meta["classes"]) == 21
    assert meta["ignore_index"] == 255 and len(meta["palette"]) == 21
    assert meta["palette"][:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]] and meta["palette"][15] == [192, 128, 128]
    assert len(open_packed(tmp_path / "dst" / "val_lmdb")) == 1
    record = reader[1]
    assert record["image_id"] == 2008000002 and record["file_name"] == "2008_000002.jpg"
    assert (record["height"], record["width"]) == (HEIGHT, WIDTH)
    assert Image.open(io.BytesIO(record["mask"])).mode == "L"
    assert np.array_equal(decode_mask(record["mask"]).numpy(), _mask(1))
    dataset = open_dataset(tmp_path / "dst" / "train_lmdb")
    assert isinstance(dataset, SegmentationDataset)
    _image, target = dataset[0]
    assert np.array_equal(target["mask"].numpy(), _mask(0))
    assert verify_packed(tmp_path / "dst" / "train_lmdb", progress=False)["ok"]


def test_without_a_segmentation_list_the_main_ids_with_a_mask_are_packed(tmp_path: Path) -> None:
    voc = voc_tree(tmp_path / "src")
    (voc / "ImageSets/Segmentation/val.txt").unlink()
    summary, notes = pack_voc_split(voc, tmp_path / "dst", "val", "segmentation")
    assert summary.count == 1 and summary.rejected == 0  # 2008_000004 has no mask: not listed, not rejected
    assert "packing the 1 of 2 ids" in notes[0] and "ImageSets/Main/val.txt" in notes[0]


def test_bad_masks_are_rejected_named_and_listed(tmp_path: Path) -> None:
    voc = voc_tree(tmp_path / "src")
    masks = voc / "SegmentationClass"
    for seed, voc_id in enumerate(("2008_000201", "2008_000202", "2008_000203", "2008_000204")):
        (voc / "JPEGImages" / f"{voc_id}.jpg").write_bytes(_jpeg(20 + seed))
    (masks / "2008_000201.png").write_bytes(_palette_png(np.zeros((HEIGHT, WIDTH + 1), np.uint8)))
    outside = _mask(3)
    outside[5, 5] = 37
    (masks / "2008_000202.png").write_bytes(_palette_png(outside))
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(buffer, format="PNG")  # a colour mask
    (masks / "2008_000203.png").write_bytes(buffer.getvalue())
    _write_list(voc / "ImageSets/Segmentation/train.txt", [*IDS[:2], "2008_000201", "2008_000202", "2008_000203",
                                                           "2008_000204"])
    summary, _ = pack_voc_split(voc, tmp_path / "dst", "train", "segmentation", workers=2)
    assert summary.count == 2
    reasons = {Path(entry["source"]).name: entry["reason"] for entry in _rejections(summary.path)}
    assert reasons.keys() == {"2008_000201.png", "2008_000202.png", "2008_000203.png", "2008_000204.png"}
    assert "the mask is 41x30 (WxH) but its image is 40x30" in reasons["2008_000201.png"]
    assert "holds value 37" in reasons["2008_000202.png"] and "0..20 and 255" in reasons["2008_000202.png"]
    assert "RGB" in reasons["2008_000203.png"]
    assert "listed id 2008_000204 has no readable mask (cannot read the file" in reasons["2008_000204.png"]


def test_strict_segmentation_stops_on_a_bad_mask(tmp_path: Path, hat) -> None:
    voc = voc_tree(tmp_path / "src")
    (voc / "SegmentationClass" / "2008_000002.png").write_bytes(_palette_png(np.zeros((5, 5), np.uint8)))
    result = hat("pack", "voc", "--src-data-dir", voc, "--target-data-dir", tmp_path / "dst", "--split", "train",
                 "--task", "segmentation", "--strict", "--workers", "0")
    assert result.code == 1 and "2008_000002.png" in result.err and "5x5" in result.err
    assert not (tmp_path / "dst" / "train_lmdb").exists()
