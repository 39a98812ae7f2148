"""`hat pack imagenet | coco | mnist`: real packers on raw data generated here.

What they pin: every kind round-trips (the stored bytes are the source files' bytes), packing is
deterministic whatever the number of workers, an interrupted pack (Ctrl-C or kill -9) continues
to the same database, and every kind of bad input is skipped, named and listed, or with
`--strict` stops the pack without leaving a database behind.
"""

from __future__ import annotations

import gzip
import io
import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from hatcli.data.datasets import ClassificationDataset, DetectionDataset, coco_ground_truth
from hatcli.data.lmdb_format import open_packed, verify_packed
from hatcli.data.packers.coco import pack_coco_split
from hatcli.data.packers.imagenet import pack_imagenet_split
from hatcli.data.packers.mnist import pack_mnist_split
from hatcli.errors import DataError, Interrupted

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def _image_bytes(seed: int, size: tuple[int, int] = (20, 24), fmt: str = "JPEG") -> bytes:
    """A small noisy RGB image (width, height = size), encoded."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _class_tree(root: Path, per_class: int = 6) -> Path:
    """root/train/{cat,dog,fish}/NN.jpg|png, as ImageNet is laid out."""
    for c, name in enumerate(("dog", "cat", "fish")):  # created out of order: labels follow sorted names
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            fmt = "PNG" if i % 3 == 0 else "JPEG"
            (folder / f"{i:02d}.{'png' if fmt == 'PNG' else 'jpg'}").write_bytes(_image_bytes(10 * c + i, fmt=fmt))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def _db_items(path: Path) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of an LMDB database, in key order."""
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        items = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    env.close()
    return items


def _listing(folder: Path) -> list[str]:
    """The names in `folder`; a pack leaves its database, its rejected list and its lock file (`.NAME.lock`)."""
    return sorted(p.name for p in folder.iterdir())


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- imagenet -----------------------------------------------------------------------------------


def test_imagenet_round_trip_keeps_the_files_bytes_and_sorted_class_names(tmp_path: Path) -> None:
    src = _class_tree(tmp_path / "src")
    summary, ignored = pack_imagenet_split(src, tmp_path / "dst", "train", workers=0)
    assert summary.count == 18 and summary.rejected == 0 and ignored == 1  # notes.txt
    ds = ClassificationDataset(tmp_path / "dst" / "train_lmdb")
    assert ds.classes == ["cat", "dog", "fish"]
    assert ds.meta["source"] == "imagenet" and ds.meta["split"] == "train"
    reader = open_packed(tmp_path / "dst" / "train_lmdb")
    for index in range(len(reader)):
        record = reader[index]
        assert record["image"] == (src / "train" / record["name"]).read_bytes()
        assert ds.classes[record["label"]] == record["name"].split("/")[0]
    image, label = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 20)
    assert verify_packed(tmp_path / "dst" / "train_lmdb", progress=False)["count"] == 18


def test_workers_do_not_change_a_single_byte(tmp_path: Path) -> None:
    src = _class_tree(tmp_path / "src", per_class=40)
    pack_imagenet_split(src, tmp_path / "serial", "train", workers=0)
    pack_imagenet_split(src, tmp_path / "parallel", "train", workers=2)
    assert (tmp_path / "serial/train_lmdb/data.mdb").read_bytes() == (tmp_path / "parallel/train_lmdb/data.mdb").read_bytes()


class _StopAfter:
    """An `on_item` hook that presses Ctrl-C once `n` items are packed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, items_done: int) -> None:
        if items_done == self.n:
            raise KeyboardInterrupt


def test_an_interrupted_pack_continues_to_the_same_database(tmp_path: Path) -> None:
    src = _class_tree(tmp_path / "src", per_class=400)  # 1200 images: more than one commit batch
    pack_imagenet_split(src, tmp_path / "whole", "train", workers=0)
    with pytest.raises(Interrupted, match="run the same command again"):
        pack_imagenet_split(src, tmp_path / "cut", "train", workers=0, on_item=_StopAfter(700))
    assert not (tmp_path / "cut" / "train_lmdb").exists()  # nothing looks complete
    with pytest.raises(DataError, match="no packed data"):
        open_packed(tmp_path / "cut" / "train_lmdb")
    summary, _ = pack_imagenet_split(src, tmp_path / "cut", "train", workers=2)
    assert summary.resumed_items == 700
    assert _db_items(tmp_path / "cut" / "train_lmdb") == _db_items(tmp_path / "whole" / "train_lmdb")
    assert _listing(tmp_path / "cut") == [".train_lmdb.lock", "train_lmdb"]


KILLER = """
import os, signal, sys
from hatcli.data.packers.imagenet import pack_imagenet_split
def kill(done):
    if done == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
pack_imagenet_split(sys.argv[1], sys.argv[2], "train", workers=0, on_item=kill)
"""


def test_a_pack_killed_with_sigkill_continues_to_the_same_database(tmp_path: Path) -> None:
    src = _class_tree(tmp_path / "src", per_class=400)
    pack_imagenet_split(src, tmp_path / "whole", "train", workers=0)
    run = subprocess.run([sys.executable, "-c", KILLER, str(src), str(tmp_path / "cut"), "1000"],
                         capture_output=True, timeout=120)
    assert run.returncode == -signal.SIGKILL
    assert (tmp_path / "cut" / "train_lmdb.partial").is_dir()
    summary, _ = pack_imagenet_split(src, tmp_path / "cut", "train", workers=0)
    assert 0 < summary.resumed_items <= 1000  # progress is saved per committed batch
    assert _db_items(tmp_path / "cut" / "train_lmdb") == _db_items(tmp_path / "whole" / "train_lmdb")


def test_a_changed_source_is_packed_afresh_not_resumed(tmp_path: Path) -> None:
    src = _class_tree(tmp_path / "src", per_class=400)
    with pytest.raises(Interrupted):
        pack_imagenet_split(src, tmp_path / "dst", "train", workers=0, on_item=_StopAfter(600))
    (src / "train" / "cat" / "00.png").write_bytes(_image_bytes(999, fmt="PNG"))
    summary, _ = pack_imagenet_split(src, tmp_path / "dst", "train", workers=0)
    assert summary.resumed_items == 0
    assert open_packed(tmp_path / "dst" / "train_lmdb")[0]["image"] == _image_bytes(999, fmt="PNG")


def _bad_tree(root: Path) -> Path:
    src = _class_tree(root)
    good = _image_bytes(1)
    (src / "train" / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "train" / "dog" / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    (src / "train" / "dog" / "text.jpg").write_text("hello")
    (src / "train" / "fish" / "empty.png").write_bytes(b"")
    (src / "train" / "fish" / "dangling.jpg").symlink_to(root / "does-not-exist.jpg")
    return src


BAD_FILES = {
    "cat/truncated.jpg": "cannot decode",
    "dog/garbage.jpg": "cannot decode",
    "dog/text.jpg": "not a JPEG or PNG",
    "fish/empty.png": "empty file",
    "fish/dangling.jpg": "cannot read the file",
}


def test_bad_images_are_skipped_named_and_listed(tmp_path: Path) -> None:
    src = _bad_tree(tmp_path / "src")
    before = _tree(src)
    summary, _ = pack_imagenet_split(src, tmp_path / "dst", "train", workers=2)
    assert summary.count == 18 and summary.rejected == len(BAD_FILES)
    listed = [json.loads(line) for line in summary.rejected_file.read_text().splitlines()]
    assert summary.rejected_file == tmp_path / "dst" / "train_lmdb.rejected.jsonl"
    reasons = {Path(r["source"]).relative_to(src / "train").as_posix(): r["reason"] for r in listed}
    assert reasons.keys() == BAD_FILES.keys()
    for name, reason in BAD_FILES.items():
        assert reason in reasons[name]
    assert _tree(src) == before  # the source is only read
    assert _listing(tmp_path / "dst") == [".train_lmdb.lock", "train_lmdb", "train_lmdb.rejected.jsonl"]


def test_strict_stops_at_the_first_bad_image_and_leaves_no_database(tmp_path: Path, hat) -> None:
    src = _bad_tree(tmp_path / "src")
    result = hat("pack", "imagenet", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst",
                 "--split", "train", "--strict", "--workers", "0")
    assert result.code == 1
    assert "truncated.jpg" in result.err and "--strict" in result.err
    assert not (tmp_path / "dst" / "train_lmdb").exists()
    assert not (tmp_path / "dst" / "train_lmdb.partial").exists()


def test_the_cli_prints_a_summary_of_rejections(tmp_path: Path, hat) -> None:
    src = _bad_tree(tmp_path / "src")
    result = hat("pack", "imagenet", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst", "--split", "train")
    assert result.code == 0, result.err
    assert "packed 18 records" in result.out and "5 rejected" in result.out
    assert "5 rejected while packing" in result.err and "truncated.jpg" in result.err


def test_a_split_name_cannot_leave_the_target_folder(tmp_path: Path, hat) -> None:
    src = _class_tree(tmp_path / "src")
    result = hat("pack", "imagenet", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst",
                 "--split", "../train")
    assert result.code == 2 and "not a plain name" in result.err
    assert not (tmp_path / "train_lmdb").exists()


# -- coco ---------------------------------------------------------------------------------------


def _coco_source(root: Path) -> Path:
    """A custom COCO-format dataset: 4 images, categories with ids 5 and 9 (not 1..80)."""
    (root / "val2017").mkdir(parents=True)
    images, annotations = [], []
    for i in range(4):
        name = f"{i:03d}.jpg"
        (root / "val2017" / name).write_bytes(_image_bytes(i, size=(40, 30)))
        images.append({"id": 100 + i, "file_name": name, "width": 40, "height": 30})
        annotations.append({"id": 10 * i + 1, "image_id": 100 + i, "category_id": 9 if i % 2 else 5,
                            "bbox": [2.0, 3.0, 10.0, 12.0], "area": 120.0, "iscrowd": 0})
    annotations.append({"id": 99, "image_id": 101, "category_id": 5, "bbox": [20, 5, 15, 20],
                        "area": 300.0, "iscrowd": 1})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 9, "name": "kite"}, {"id": 5, "name": "bus"}]}
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    return root


def _coco(root: Path) -> dict:
    return json.loads((root / "annotations" / "instances_val2017.json").read_text())


def _write_coco(root: Path, coco: dict) -> None:
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))


def _pack_coco(src: Path, dst: Path, **kwargs):
    return pack_coco_split(src / "annotations" / "instances_val2017.json", src / "val2017", dst, "val", **kwargs)


def test_coco_round_trip_keeps_original_ids_and_maps_labels_from_the_json(tmp_path: Path) -> None:
    src = _coco_source(tmp_path / "src")
    summary = _pack_coco(src, tmp_path / "dst")
    assert summary.count == 4 and summary.rejected == 0
    ds = DetectionDataset(tmp_path / "dst" / "val_lmdb")
    assert ds.classes == ["bus", "kite"] and ds.meta["category_ids"] == [5, 9]
    record = open_packed(tmp_path / "dst" / "val_lmdb")[1]
    assert record["image_id"] == 101 and record["category_ids"] == [9, 5] and record["labels"] == [1, 0]
    assert record["iscrowd"] == [0, 1] and record["ann_ids"] == [11, 99]
    assert record["image"] == (src / "val2017" / "001.jpg").read_bytes()
    _image, target = ds[1]
    assert target["labels"].tolist() == [1]  # the crowd box is not a training target
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 15.0]]


def test_coco_ground_truth_scored_against_itself_is_perfect(tmp_path: Path) -> None:
    from hatcli.metrics.coco import CocoDetectionMetric

    src = _coco_source(tmp_path / "src")
    _pack_coco(src, tmp_path / "dst")
    reader = open_packed(tmp_path / "dst" / "val_lmdb")
    ground_truth = coco_ground_truth(reader)
    original = _coco(src)
    assert sorted(a["bbox"] for a in ground_truth["annotations"]) == sorted(a["bbox"] for a in original["annotations"])
    metric = CocoDetectionMetric(ground_truth, reader.meta["category_ids"])
    for index in range(len(reader)):
        record = reader[index]
        keep = [i for i, crowd in enumerate(record["iscrowd"]) if not crowd]
        boxes = torch.tensor([record["boxes"][i] for i in keep]).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        metric.update([record["image_id"]], [{"boxes": boxes, "scores": torch.ones(len(keep)),
                                               "labels": torch.tensor([record["labels"][i] for i in keep])}])
    assert metric.compute()["mAP"] == pytest.approx(100.0)


def _break_coco(src: Path) -> None:
    coco = _coco(src)
    coco["images"] += [
        {"id": 100, "file_name": "000.jpg", "width": 40, "height": 30},  # duplicate image id
        {"id": 200, "file_name": "../escape.jpg", "width": 40, "height": 30},
        {"id": 201, "file_name": "missing.jpg", "width": 40, "height": 30},
        {"id": 202, "file_name": "wrong_size.jpg", "width": 50, "height": 30},
    ]
    (src / "escape.jpg").write_bytes(_image_bytes(7))
    (src / "val2017" / "wrong_size.jpg").write_bytes(_image_bytes(8, size=(40, 30)))
    coco["annotations"] += [
        {"id": 1, "image_id": 102, "category_id": 5, "bbox": [1, 1, 5, 5]},  # duplicate annotation id
        {"id": 50, "image_id": 999, "category_id": 5, "bbox": [1, 1, 5, 5]},  # unknown image
        {"id": 51, "image_id": 102, "category_id": 77, "bbox": [1, 1, 5, 5]},  # unknown category
        {"id": 52, "image_id": 102, "category_id": 5, "bbox": [30, 20, 15, 5]},  # outside the 40x30 image
        {"id": 53, "image_id": 102, "category_id": 5, "bbox": [1, 1, 0, 5]},  # no width
    ]
    _write_coco(src, coco)


COCO_PROBLEMS = [
    "duplicate image id 100", "not a relative path inside", "cannot read the file", "annotation file says 50x30",
    "duplicate annotation id 1", "image id 999", "unknown category id 77", "outside its 40x30 image",
    "non-positive size",
]


def test_bad_coco_records_are_skipped_named_and_listed(tmp_path: Path) -> None:
    src = _coco_source(tmp_path / "src")
    _break_coco(src)
    summary = _pack_coco(src, tmp_path / "dst", workers=2)
    assert summary.count == 4
    listed = [json.loads(line) for line in summary.rejected_file.read_text().splitlines()]
    assert len(listed) == len(COCO_PROBLEMS)
    for problem in COCO_PROBLEMS:
        assert sum(problem in entry["reason"] for entry in listed) == 1, problem
    assert all(entry["source"] for entry in listed)
    assert next(e for e in listed if "cannot read" in e["reason"])["source"].endswith("missing.jpg")
    assert open_packed(tmp_path / "dst" / "val_lmdb")[2]["ann_ids"] == [21]  # the good box survives


def test_strict_coco_stops_on_a_bad_annotation(tmp_path: Path, hat) -> None:
    src = _coco_source(tmp_path / "src")
    _break_coco(src)
    result = hat("pack", "coco", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst", "--split", "val",
                 "--strict")
    assert result.code == 1 and "duplicate image id 100" in result.err
    assert not (tmp_path / "dst" / "val_lmdb").exists() and not (tmp_path / "dst" / "val_lmdb.partial").exists()


def test_coco_with_an_explicit_annotation_file(tmp_path: Path, hat) -> None:
    src = _coco_source(tmp_path / "src")
    (src / "annotations" / "instances_val2017.json").rename(src / "my_labels.json")
    result = hat("pack", "coco", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst", "--split", "val",
                 "--ann-file", src / "my_labels.json", "--json")
    assert result.code == 0, result.err
    assert result.json()["databases"] == {str(tmp_path / "dst" / "val_lmdb"): 4}


COCO_TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-tiny"


def test_real_coco_subset_packs_without_rejections(tmp_path: Path) -> None:
    if not COCO_TINY.is_dir():
        pytest.skip(f"{COCO_TINY} not present (the real COCO subset in ../shared/data)")
    for split in ("train", "val"):
        summary = pack_coco_split(COCO_TINY / "annotations" / f"instances_{split}2017.json",
                                  COCO_TINY / f"{split}2017", tmp_path, split, workers=2)
        assert summary.count == 80 and summary.rejected == 0
    assert len(open_packed(tmp_path / "val_lmdb").meta["category_ids"]) == 80


# -- mnist --------------------------------------------------------------------------------------


def _idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _mnist_source(root: Path, n_train: int = 30, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    labels = (np.arange(n_train) % 10).astype(np.uint8)
    _idx(root / "train-images-idx3-ubyte.gz", 0x803, images)
    _idx(root / "train-labels-idx1-ubyte.gz", 0x801, labels)
    _idx(root / "t10k-images-idx3-ubyte.gz", 0x803, images[:n_test])
    _idx(root / "t10k-labels-idx1-ubyte.gz", 0x801, labels[:n_test])
    return images, labels


def test_mnist_round_trip_is_lossless(tmp_path: Path) -> None:
    images, labels = _mnist_source(tmp_path / "mnist")
    assert pack_mnist_split(tmp_path / "mnist", tmp_path / "dst", "train").count == 30
    assert pack_mnist_split(tmp_path / "mnist", tmp_path / "dst", "val").count == 10
    ds = ClassificationDataset(tmp_path / "dst" / "train_lmdb")
    assert ds.classes == [str(d) for d in range(10)]
    for index in (0, 7, 29):
        image, label = ds[index]
        assert image.shape == (3, 28, 28) and label == labels[index]
        assert torch.equal(image[0], torch.from_numpy(images[index])) and torch.equal(image[0], image[2])


def test_fashion_mnist_gets_its_class_names(tmp_path: Path) -> None:
    _mnist_source(tmp_path / "fashion-mnist")
    pack_mnist_split(tmp_path / "fashion-mnist", tmp_path / "dst", "val")
    assert open_packed(tmp_path / "dst" / "val_lmdb").meta["classes"][0] == "T-shirt/top"


def test_a_truncated_idx_file_is_named(tmp_path: Path) -> None:
    _mnist_source(tmp_path / "mnist")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz holds .* bytes but its header promises"):
        pack_mnist_split(tmp_path / "mnist", tmp_path / "dst", "train")


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def test_debian_fashion_mnist_packs(tmp_path: Path) -> None:
    if not FASHION_MNIST.is_dir():
        pytest.skip(f"{FASHION_MNIST} not present (apt-get install dataset-fashion-mnist)")
    summary = pack_mnist_split(FASHION_MNIST, tmp_path, "val", workers=2)
    assert summary.count == 10_000 and summary.rejected == 0


# -- readers --------------------------------------------------------------------------------------


def test_distributed_sampler_splits_the_packed_data_between_ranks(tmp_path: Path) -> None:
    _mnist_source(tmp_path / "mnist")
    pack_mnist_split(tmp_path / "mnist", tmp_path / "dst", "train")
    ds = ClassificationDataset(tmp_path / "dst" / "train_lmdb")
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2)
        seen.append([int(label) for _, labels in loader for label in labels])
    assert len(seen[0]) == len(seen[1]) == 15
    assert sorted(seen[0] + seen[1]) == sorted(int(x) for x in np.arange(30) % 10)


def test_verify_finds_a_corrupted_record(tmp_path: Path, hat) -> None:
    _mnist_source(tmp_path / "mnist")
    pack_mnist_split(tmp_path / "mnist", tmp_path / "dst", "val")
    db = tmp_path / "dst" / "val_lmdb"
    assert hat("pack", "verify", db).code == 0
    open_packed(db).close()  # one environment per file per process: let the test write to it
    env = lmdb.open(str(db), lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"%08d" % 3, txn.get(b"%08d" % 3)[:-1] + b"\x00")
    env.close()
    result = hat("pack", "verify", db)
    assert result.code == 1 and "checksum mismatch" in result.err

