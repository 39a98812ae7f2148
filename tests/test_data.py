"""The data layer, end to end: generate shapes -> pack to LMDB -> read back as torch datasets.

These tests double as documentation of the packed format (hatcli/data/lmdb_format.py) and of
the recipe-configurable transforms (hatcli/data/transforms.py).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import lmdb
import msgpack
import pytest
import torch
from torch.utils.data import DataLoader

from hatcli.data.datasets import (
    ClassificationDataset,
    DetectionDataset,
    coco_ground_truth,
    detection_collate,
    open_dataset,
)
from hatcli.data.lmdb_format import META_KEY, open_packed, record_key, verify_packed
from hatcli.data.lmdb_writer import LmdbWriter
from hatcli.data.shapes import CLASSES, pack_shapes
from hatcli.data.transforms import TRANSFORMS, build_transforms
from hatcli.errors import DataError, RecipeError
from hatcli.family import PackRequest

SIZE = 32

# torchvision 0.29 deprecates its image decoders in favour of torchcodec (not installed here).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def _pack(root: Path, task: str, num_images: int = 30, seed: int = 0) -> dict[str, int]:
    request = PackRequest(kind="shapes", target_data_dir=root, task=task, num_images=num_images,
                          image_size=SIZE, seed=seed)
    return pack_shapes(request).databases


@pytest.fixture(scope="module")
def cls_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes_cls")
    _pack(root, "classification")
    return root


@pytest.fixture(scope="module")
def det_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes_det")
    _pack(root, "detection")
    return root


# -- hat pack shapes --------------------------------------------------------------------------


def test_pack_shapes_classification_writes_imagenet_layout_and_two_databases(tmp_path: Path) -> None:
    databases = _pack(tmp_path, "classification", num_images=30)
    # num_images is the total: 20% goes to val.
    assert databases == {str(tmp_path / "train_lmdb"): 24, str(tmp_path / "val_lmdb"): 6}
    for name in CLASSES:  # every class folder exists, in both splits
        assert (tmp_path / "raw" / "train" / name).is_dir()
        assert (tmp_path / "raw" / "val" / name).is_dir()
    jpgs = sorted((tmp_path / "raw" / "train").glob("*/*.jpg"))
    assert len(jpgs) == 24 and jpgs[0].read_bytes()[:3] == b"\xff\xd8\xff"


def test_classification_dataset_reads_back_uint8_images_and_labels(cls_root: Path) -> None:
    ds = ClassificationDataset(cls_root / "train_lmdb")
    assert len(ds) == 24
    assert ds.classes == list(CLASSES) == sorted(CLASSES)
    assert ds.meta["format"] == "hat-lmdb" and ds.meta["version"] == 1
    assert ds.meta["kind"] == "classification" and ds.meta["split"] == "train"
    image, label = ds[0]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
    assert sorted({ds[i][1] for i in range(len(ds))}) == list(range(len(CLASSES)))
    assert isinstance(label, int)


def test_records_store_the_encoded_files_as_they_are(cls_root: Path) -> None:
    record = open_packed(cls_root / "val_lmdb")[0]
    assert set(record) == {"image", "label", "name"}
    assert record["image"] == (cls_root / "raw" / "val" / record["name"]).read_bytes()


def test_pack_shapes_detection_writes_coco_layout(det_root: Path) -> None:
    raw = det_root / "raw"
    coco = json.loads((raw / "annotations" / "instances_val2017.json").read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(CLASSES) + 1))
    assert len(coco["images"]) == 6 and coco["annotations"]
    for im in coco["images"]:
        assert (raw / "val2017" / im["file_name"]).is_file()
    ann = coco["annotations"][0]
    assert set(ann) >= {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}


def test_detection_dataset_boxes_are_xyxy_inside_the_image(det_root: Path) -> None:
    ds = DetectionDataset(det_root / "train_lmdb")
    assert len(ds) == 24 and ds.classes == list(CLASSES)
    assert ds.meta["category_ids"] == list(range(1, len(CLASSES) + 1))
    assert ds.meta["coco_categories"][0] == {"id": 1, "name": CLASSES[0], "supercategory": "shape"}
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
        assert labels.dtype == torch.int64 and 1 <= len(labels) <= 4
        assert ((labels >= 0) & (labels < len(CLASSES))).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= SIZE).all() and (boxes[:, 3] <= SIZE).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert target["orig_size"] == (SIZE, SIZE) and isinstance(target["image_id"], int)


def test_detection_collate_and_geometric_transforms_move_boxes(det_root: Path) -> None:
    plain = DetectionDataset(det_root / "val_lmdb")
    pipeline = build_transforms(
        [{"name": "Resize", "size": [64, 96]}, {"name": "RandomHorizontalFlip", "p": 1.0}, {"name": "ToFloat"}],
        "data.val_transforms",
    )
    ds = open_dataset(det_root / "val_lmdb", pipeline)
    assert isinstance(ds, DetectionDataset)
    images, targets = detection_collate([ds[i] for i in range(3)])
    assert images.shape == (3, 3, 64, 96) and images.dtype == torch.float32
    before = plain[0][1]["boxes"]
    after = targets[0]["boxes"]
    assert type(after) is torch.Tensor  # tv_tensors are unwrapped again
    sx, sy = 96 / SIZE, 64 / SIZE  # scaled, then mirrored: x1' = W - x2
    expected = torch.stack([96 - before[:, 2] * sx, before[:, 1] * sy, 96 - before[:, 0] * sx, before[:, 3] * sy], 1)
    assert torch.allclose(after, expected, atol=1e-3)


def test_coco_ground_truth_scores_perfectly_against_itself(det_root: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = coco_ground_truth(det_root / "val_lmdb")
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    evaluator = COCOeval(coco, coco.loadRes(dets), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_packing_twice_gives_byte_identical_databases(tmp_path: Path) -> None:
    for task in ("classification", "detection"):
        _pack(tmp_path / "a" / task, task, num_images=20, seed=7)
        _pack(tmp_path / "b" / task, task, num_images=20, seed=7)
        _pack(tmp_path / "c" / task, task, num_images=20, seed=8)
        for split in ("train", "val"):
            a, b, c = (tmp_path / run / task / f"{split}_lmdb" for run in "abc")
            assert (a / "data.mdb").read_bytes() == (b / "data.mdb").read_bytes()
            sums = [open_packed(p).meta["checksums"]["records_sha256"] for p in (a, b, c)]
            assert sums[0] == sums[1] != sums[2]  # another seed, other images


def test_datasets_load_in_dataloader_workers_after_use_in_the_parent(cls_root: Path) -> None:
    ds = ClassificationDataset(cls_root / "train_lmdb", build_transforms([{"name": "ToFloat"}], "t"))
    ds[0]  # the parent opens the environment; forked workers must open their own
    loader = DataLoader(ds, batch_size=8, num_workers=2)
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == [ds[i][1] for i in range(len(ds))]
    clone = pickle.loads(pickle.dumps(ds))  # what spawned workers receive
    assert torch.equal(clone[3][0], ds[3][0])


# -- the packed format ------------------------------------------------------------------------


def _records(n: int, size: int = 100) -> list[dict]:
    return [{"image": bytes([i % 256]) * size, "label": i % 3, "name": f"r{i}"} for i in range(n)]


def test_writer_grows_a_tiny_map(tmp_path: Path) -> None:
    records = _records(60, size=20_000)  # about 1.2 MB into a 64 KiB map
    with LmdbWriter(tmp_path / "db", "classification", "train", ["a", "b", "c"], map_size=64 << 10) as writer:
        for i, record in enumerate(records):
            writer.put(i, record)
    reader = open_packed(tmp_path / "db")
    assert len(reader) == 60 and reader[59] == records[59]
    assert verify_packed(tmp_path / "db", progress=False)["count"] == 60


def test_writer_accepts_records_out_of_order(tmp_path: Path) -> None:
    records = _records(10)
    for name, order in (("in_order", range(10)), ("shuffled", [3, 0, 9, 1, 2, 8, 4, 7, 5, 6])):
        with LmdbWriter(tmp_path / name, "classification", "train", ["a", "b", "c"]) as writer:
            for i in order:
                writer.put(i, records[i])
    metas = [open_packed(tmp_path / name).meta for name in ("in_order", "shuffled")]
    assert metas[0]["count"] == metas[1]["count"] == 10
    assert metas[0]["checksums"] == metas[1]["checksums"]


def test_interrupted_write_leaves_no_database(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with LmdbWriter(tmp_path / "db", "classification", "train", ["a"]) as writer:
            writer.put(0, _records(1)[0])
            raise KeyboardInterrupt
    assert not (tmp_path / "db").exists() and not (tmp_path / "db.partial").exists()
    with pytest.raises(DataError, match="hat pack"):
        open_packed(tmp_path / "db")


def _rewrite(path: Path, key: bytes, value: bytes) -> None:
    env = lmdb.open(str(path), lock=False)
    with env.begin(write=True) as txn:
        txn.put(key, value)
    env.close()


def test_unknown_version_or_missing_meta_is_refused(tmp_path: Path) -> None:
    with LmdbWriter(tmp_path / "db", "classification", "train", ["a"]) as writer:
        writer.put(0, _records(1)[0])
    meta = msgpack.unpackb(_read_raw(tmp_path / "db", META_KEY))
    _rewrite(tmp_path / "db", META_KEY, msgpack.packb({**meta, "version": 99}))
    with pytest.raises(DataError, match=r"version 99.*re-pack it with `hat pack`"):
        open_packed(tmp_path / "db")

    env = lmdb.open(str(tmp_path / "foreign"), lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"00000000", b"not ours")
    env.close()
    with pytest.raises(DataError, match="no `__meta__` record"):
        open_packed(tmp_path / "foreign")


def _read_raw(path: Path, key: bytes) -> bytes:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        value = txn.get(key)
    env.close()
    return value


def test_verify_detects_a_corrupted_record(cls_root: Path, tmp_path: Path) -> None:
    db = tmp_path / "val_lmdb"
    db.mkdir()
    (db / "data.mdb").write_bytes((cls_root / "val_lmdb" / "data.mdb").read_bytes())
    report = verify_packed(db, progress=False)
    assert report["ok"] and report["count"] == 6
    open_packed(db).close()  # one environment per file per process: close ours before writing

    record = msgpack.unpackb(_read_raw(db, record_key(3)))
    record["label"] = (record["label"] + 1) % len(CLASSES)
    _rewrite(db, record_key(3), msgpack.packb(record))
    with pytest.raises(DataError, match="checksum mismatch"):
        verify_packed(db, progress=False)


def test_dataset_refuses_the_wrong_kind(det_root: Path) -> None:
    with pytest.raises(DataError, match="holds detection data"):
        ClassificationDataset(det_root / "val_lmdb")


# -- transforms -------------------------------------------------------------------------------


def test_recipe_transforms_build_a_pipeline(cls_root: Path) -> None:
    pipeline = build_transforms(
        [
            {"name": "RandomResizedCrop", "size": 24, "scale": [0.6, 1.0]},
            {"name": "RandomHorizontalFlip"},
            {"name": "ColorJitter", "brightness": 0.2, "contrast": 0.2},
            {"name": "ToFloat"},
            {"name": "RGBToYUV444"},
            {"name": "Normalize", "mean": 128, "std": 128},
        ],
        "data.train_transforms",
    )
    image, _ = ClassificationDataset(cls_root / "train_lmdb", pipeline)[0]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1


def test_rgb_to_yuv444_is_bt601_full_range() -> None:
    to_yuv = build_transforms([{"name": "RGBToYUV444"}], "t")
    rgb = torch.tensor([[255, 255, 255], [255, 0, 0], [255, 0, 255]], dtype=torch.uint8).reshape(3, 1, 3)
    yuv = to_yuv(rgb)  # pixels: white, red, magenta
    assert yuv[:, 0, 0].tolist() == [255, 128, 128]
    assert yuv[:, 0, 1].tolist() == [76, 85, 255]
    assert yuv[:, 0, 2].tolist() == [105, 212, 235]


def test_unknown_transform_names_the_key_and_the_closest_name() -> None:
    with pytest.raises(RecipeError) as err:
        build_transforms([{"name": "Resize", "size": 8}, {"name": "RandomHorizontalFlp"}], "data.train_transforms")
    message = str(err.value)
    assert "data.train_transforms[1].name" in message
    assert "`RandomHorizontalFlp`" in message and "did you mean `RandomHorizontalFlip`" in message


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"name": "Resize", "sise": 8}, r"\[0\]\.sise: `Resize` takes no argument `sise`; did you mean `size`"),
        ({"name": "Resize"}, r"\[0\]: `Resize` needs `size`"),
        ({"name": "RandomResizedCrop", "size": 8, "scale": [1.0, 0.5]}, r"\[0\]\.scale: low must not exceed high"),
        ({"name": "Normalize", "mean": 128, "std": [1, 0, 1]}, r"\[0\]\.std: must be positive"),
        ({"name": "RandomHorizontalFlip", "p": 2}, r"\[0\]\.p: must be in \[0.0, 1.0\]"),
        ({"size": 8}, r"\[0\]: missing `name`"),
    ],
)
def test_bad_transform_arguments_name_the_key(spec: dict, expected: str) -> None:
    with pytest.raises(RecipeError, match=r"data\.val_transforms" + expected):
        build_transforms([spec], "data.val_transforms")


def test_every_registered_transform_runs_on_a_uint8_image() -> None:
    arguments = {"Resize": {"size": 8}, "CenterCrop": {"size": 8}, "RandomResizedCrop": {"size": 8},
                 "Normalize": {"mean": 128, "std": 128}, "ColorJitter": {"brightness": 0.1},
                 "RandomCrop": {"size": 8}, "Pad": {"size_divisor": 8}}
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    for name in TRANSFORMS.names():
        specs = [{"name": name, **arguments.get(name, {})}]
        if name == "Normalize":  # Normalize needs floats
            specs.insert(0, {"name": "ToFloat"})
        out = build_transforms(specs, "t")(image)
        assert out.shape[0] == 3, name


def test_detection_collate_pads_mixed_sizes_at_the_bottom_right() -> None:
    small = (torch.full((3, 10, 20), 7, dtype=torch.uint8), {"boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0]])})
    large = (torch.full((3, 16, 12), 9, dtype=torch.uint8), {"boxes": torch.zeros((0, 4))})
    images, targets = detection_collate([small, large])
    assert images.shape == (2, 3, 16, 20) and images.dtype == torch.uint8
    assert (images[0, :, :10, :20] == 7).all() and (images[0, :, 10:] == 0).all()
    assert (images[1, :, :, :12] == 9).all() and (images[1, :, :, 12:] == 0).all()
    assert targets[0]["img_size"] == (10, 20) and targets[1]["img_size"] == (16, 12)
    assert targets[0]["boxes"].tolist() == [[1.0, 2.0, 5.0, 6.0]]  # padding never moves a box


def test_loader_hands_workers_uint8_and_normalizes_whole_batches_on_the_device(tiny_shapes: Path, tmp_path: Path) -> None:
    from hatcli.engine.loaders import build_loader
    from hatcli.inputs import model_input
    from hatcli.recipe import load_recipe

    text = f"""
task = "t"
[data]
root = "{tiny_shapes}"
input_size = [32, 32]
batch_size = 8
mean = [100.0, 110.0, 120.0]
std = [50.0, 60.0, 70.0]
batch_transforms = [{{ name = "RGBToYUV444" }}]
[model]
name = "mobilenet_v1"
"""
    (tmp_path / "r.toml").write_text(text)
    lr = load_recipe(tmp_path / "r.toml")
    loader = build_loader(lr, "val", device="cpu")
    assert loader.dataset[0][0].dtype == torch.uint8  # what a worker hands over
    images, labels = next(iter(loader))
    raw = torch.stack([loader.dataset[i][0] for i in range(8)])
    yuv = build_transforms([{"name": "RGBToYUV444"}], "t")(raw)
    mean, std = torch.tensor([100.0, 110.0, 120.0])[:, None, None], torch.tensor([50.0, 60.0, 70.0])[:, None, None]
    assert torch.allclose(images, (yuv - mean) / std)
    assert labels.dtype == torch.int64 and len(labels) == 8
    assert torch.allclose(model_input(lr, raw[0]), images[:1])  # hat infer prepares images the same way
