"""torch Datasets over packed (LMDB) data, and the detection and segmentation collate functions.

Each dataset holds a `PackedReader`, which opens the LMDB environment lazily in whichever
process first reads a record, so datasets can be handed to DataLoader workers (fork or spawn).
Images are decoded with `torchvision.io.decode_image` into uint8 CHW RGB tensors.

Items are looked up by index (any sampler works, `DistributedSampler` included) or by an
``(epoch, index)`` key from `hatcli.engine.sampling.EpochSampler`: then the random transforms
draw from a generator seeded with ``(sample_seed, epoch, index)``, so an image's augmentation is
the same whichever worker or process loads it, and a resumed run repeats it exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from hatcli.data.lmdb_format import IGNORE_INDEX, REPACK_HINT, PackedReader, open_packed
from hatcli.errors import DataError

Transform = Any  # a callable: t(image) for classification, t(image, target) for detection


def decode(data: bytes, where: str = "image") -> torch.Tensor:
    """Decode encoded JPEG/PNG bytes into a uint8 CHW RGB tensor; DataError names `where`."""
    try:
        # bytearray: a writable buffer, so torch.frombuffer does not warn.
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise DataError(f"cannot decode {where}: {exc}") from None


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixing (seed, epoch, index) (splitmix64-style, so nearby keys differ a lot)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 29
    return x & (2**63 - 1)


class _PackedDataset(Dataset, ABC):
    """Common part: the reader, the kind check, `.meta`, `.classes`, `len`."""

    kind = ""

    def __init__(self, path: str | Path, transform: Transform | None = None) -> None:
        self.path = Path(path)
        self.reader: PackedReader = open_packed(self.path)
        if self.reader.meta["kind"] != self.kind:
            raise DataError(
                f"{self.path} holds {self.reader.meta['kind']} data, but a {self.kind} dataset was asked for"
            )
        self.transform = transform
        self.sample_seed = 0
        """Base seed of the per-sample random streams used with ``(epoch, index)`` keys."""

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            epoch, index = key
            # Only the CPU generator (the one the transforms draw from) is reseeded and restored;
            # torch.manual_seed would also reset the CUDA generators that dropout uses.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(_sample_seed(self.sample_seed, epoch, index))
                return self._item(index)
        return self._item(key)

    @abstractmethod
    def _item(self, index: int) -> Any:
        """Record `index` decoded and transformed: what `__getitem__` returns."""

    @property
    def meta(self) -> dict[str, Any]:
        """The database's meta record (format, kind, split, count, classes, checksums, ...)."""
        return self.reader.meta

    @property
    def classes(self) -> list[str]:
        """Class names in label order."""
        return list(self.reader.meta["classes"])

    def __len__(self) -> int:
        return len(self.reader)

    def _image(self, record: dict[str, Any], index: int) -> torch.Tensor:
        return decode(record["image"], f"record {index} of {self.path}")


class ClassificationDataset(_PackedDataset):
    """Items are ``(image, label)``: the transformed image (uint8 CHW before transforms) and an int."""

    kind = "classification"

    def _item(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.reader[index]
        image = self._image(record, index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(record["label"])


class DetectionDataset(_PackedDataset):
    """Items are ``(image, target)`` with target ``{"boxes": float32 [N, 4] xyxy pixels,
    "labels": int64 [N], "image_id": int, "orig_size": (h, w), "image_box": float32 [4]}``.

    Crowd annotations, difficult boxes (Pascal VOC's flag) and boxes with no width or height are
    left out of the target. A transform
    is called as ``transform(image, target)`` with the boxes as `tv_tensors.BoundingBoxes`, so the
    geometric v2 transforms move them; boxes that end up empty are dropped afterwards.
    ``image_box`` is where the original image's corners (0, 0) and (w, h) are after the
    transforms (x0 > x1 after a horizontal flip; exact through resizing, padding and flips,
    clipped by a crop): detections in model-input pixels map back to the original image through it
    (`hatcli.tasks.detection.to_original`).
    """

    kind = "detection"

    def _item(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.reader[index]
        image = self._image(record, index)
        h, w = int(image.shape[-2]), int(image.shape[-1])
        difficult = record.get("difficult") or [0] * len(record["boxes"])
        keep = [
            i for i, (box, crowd, hard) in enumerate(zip(record["boxes"], record["iscrowd"], difficult))
            if not crowd and not hard and box[2] > 0 and box[3] > 0
        ]
        boxes = torch.tensor([record["boxes"][i] for i in keep], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels = torch.tensor([record["labels"][i] for i in keep], dtype=torch.int64)
        target: dict[str, Any] = {
            "boxes": boxes,
            "labels": labels,
            "image_id": int(record["image_id"]),
            "orig_size": (h, w),
            "image_box": torch.tensor([0.0, 0.0, float(w), float(h)]),
        }
        if self.transform is None:
            return image, target
        return transform_detection(self.transform, image, target)


def transform_detection(transform: Transform, image: torch.Tensor,
                        target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Apply a detection transform to `image` (uint8 CHW) and `target` ("boxes" XYXY, "labels",
    "image_box"); return the new image and target, with `image_box` moved like the boxes and
    boxes that became empty dropped."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    target = dict(target)
    extent = target["image_box"].reshape(1, 4)
    x0, y0, x1, y1 = extent[0].tolist()
    # Two marker boxes ride along with the real ones and are taken off again afterwards: the
    # image's extent, and its top-left quarter, which tells where a flip sent the first corner
    # (a flipped box comes back with x0 < x1, so the extent alone cannot say).
    quarter = torch.tensor([[x0, y0, (x0 + x1) / 2, (y0 + y1) / 2]])
    with_markers = torch.cat([target["boxes"].reshape(-1, 4), extent, quarter])
    target["boxes"] = tv_tensors.BoundingBoxes(with_markers, format="XYXY", canvas_size=(h, w))
    image, target = transform(tv_tensors.Image(image), target)
    image = image.as_subclass(torch.Tensor)
    moved = target["boxes"].as_subclass(torch.Tensor)
    (e0, f0, e1, f1), (q0, r0, q1, r1) = moved[-2].tolist(), moved[-1].tolist()
    flip_x, flip_y = q0 + q1 > e0 + e1, r0 + r1 > f0 + f1
    target["image_box"] = torch.tensor([e1 if flip_x else e0, f1 if flip_y else f0,
                                        e0 if flip_x else e1, f0 if flip_y else f1])
    boxes = moved[:-2]
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target["boxes"], target["labels"] = boxes[valid], target["labels"][valid]
    return image, target


class SegmentationDataset(_PackedDataset):
    """Items are ``(image, target)`` with target ``{"mask": tv_tensors.Mask uint8 [H, W] (class
    index per pixel, `ignore_index` where no class counts), "image_id": int, "orig_size": (h, w),
    "image_box": float32 [4]}``.

    A transform is called as ``transform(image, target)``: the geometric v2 transforms move the
    mask with the image (nearest-neighbour resampling, so every pixel keeps a class index; padding
    fills it with `ignore_index`). ``image_box`` is where the original image's corners are after
    the transforms, as for detection: `hatcli.tasks.segmentation` maps a predicted mask back onto
    the original image through it.
    """

    kind = "segmentation"

    @property
    def ignore_index(self) -> int:
        """The mask value that no loss or metric counts (255)."""
        return int(self.reader.meta.get("ignore_index", IGNORE_INDEX))

    def _item(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.reader[index]
        image = self._image(record, index)
        mask = decode_mask(record["mask"], f"mask of record {index} of {self.path}")
        h, w = int(image.shape[-2]), int(image.shape[-1])
        if tuple(mask.shape) != (h, w):
            raise DataError(f"record {index} of {self.path}: mask is {mask.shape[1]}x{mask.shape[0]} but the "
                            f"image is {w}x{h}; {REPACK_HINT}")
        target: dict[str, Any] = {
            "mask": tv_tensors.Mask(mask),
            "image_id": int(record["image_id"]),
            "orig_size": (h, w),
            "image_box": torch.tensor([0.0, 0.0, float(w), float(h)]),
        }
        if self.transform is None:
            return image, target
        return transform_segmentation(self.transform, image, target)


def decode_mask(data: bytes, where: str = "mask") -> torch.Tensor:
    """Decode a packed mask (8-bit greyscale PNG) into a uint8 [H, W] tensor; DataError names `where`."""
    try:
        mask = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except RuntimeError as exc:
        raise DataError(f"cannot decode {where}: {exc}") from None
    if mask.ndim != 3 or mask.shape[0] != 1 or mask.dtype != torch.uint8:
        raise DataError(f"{where} is not an 8-bit single-channel PNG (shape {tuple(mask.shape)}, {mask.dtype}); "
                        f"{REPACK_HINT}")
    return mask[0]


def transform_segmentation(transform: Transform, image: torch.Tensor,
                           target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Apply a segmentation transform to `image` (uint8 CHW) and `target` ("mask", "image_box");
    return the new image and target, with the mask moved like the image and `image_box` like a box."""
    # The image's extent rides along as a box, exactly as detection's does, with no real boxes.
    with_boxes = {**target, "mask": tv_tensors.Mask(target["mask"]), "boxes": torch.zeros(0, 4),
                  "labels": torch.zeros(0, dtype=torch.int64)}
    image, moved = transform_detection(transform, image, with_boxes)
    moved.pop("boxes")
    moved.pop("labels")
    moved["mask"] = tv_tensors.Mask(moved["mask"].as_subclass(torch.Tensor).reshape(image.shape[-2:]))
    return image, moved


def segmentation_collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack images into one NCHW tensor and keep the targets as a list of dicts.

    Images of different sizes are padded at the bottom and right (zeros) to the largest size in
    the batch and their masks with the ignore index, so padded pixels count for nothing; each
    target records its image's own size as ``img_size`` (h, w).
    """
    images, targets = detection_collate(batch)
    height, width = int(images.shape[-2]), int(images.shape[-1])
    for target in targets:
        mask = target["mask"].as_subclass(torch.Tensor)
        if tuple(mask.shape) != (height, width):
            padded = mask.new_full((height, width), IGNORE_INDEX)
            padded[: mask.shape[0], : mask.shape[1]] = mask
            mask = padded
        target["mask"] = mask
    return images, targets


def batch_masks(targets: list[dict[str, Any]], device: torch.device | str | None = None) -> torch.Tensor:
    """The targets' masks as one int64 [N, H, W] tensor (what a segmentation loss takes)."""
    return torch.stack([t["mask"].as_subclass(torch.Tensor) for t in targets]).to(device=device, dtype=torch.int64)


def detection_collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack images into one NCHW tensor and keep the targets as a list of dicts.

    Images of different sizes are padded at the bottom and right (with zeros) to the largest
    height and width in the batch, so boxes keep their coordinates; each target then records its
    image's own size as ``img_size`` (h, w).
    """
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    height = max(int(img.shape[-2]) for img in images)
    width = max(int(img.shape[-1]) for img in images)
    if any(img.shape[-2:] != (height, width) for img in images):
        padded = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for i, img in enumerate(images):
            padded[i, :, : img.shape[-2], : img.shape[-1]] = img
            targets[i]["img_size"] = (int(img.shape[-2]), int(img.shape[-1]))
        return padded, targets
    for target in targets:
        target["img_size"] = (height, width)
    return torch.stack(images), targets


PackedDataset = ClassificationDataset | DetectionDataset | SegmentationDataset


def open_dataset(path: str | Path, transform: Transform | None = None) -> PackedDataset:
    """Open the packed data at `path` as the dataset its meta `kind` calls for."""
    kind = open_packed(path).meta["kind"]
    if kind == "classification":
        return ClassificationDataset(path, transform)
    if kind == "segmentation":
        return SegmentationDataset(path, transform)
    return DetectionDataset(path, transform)


def collate_for(kind: str) -> Any:
    """The DataLoader collate function for packed data of `kind` (None: the default one)."""
    return {"detection": detection_collate, "segmentation": segmentation_collate}.get(kind)


def coco_ground_truth(path_or_reader: str | Path | PackedReader) -> dict[str, Any]:
    """Return a COCO-format ground-truth dict (images, annotations, categories) of packed detection data.

    Feed it to `pycocotools.coco.COCO` (set ``coco.dataset = gt; coco.createIndex()``) to score
    predictions with COCOeval; predicted labels map back to `category_id` via
    ``meta["category_ids"][label]``.
    """
    reader = path_or_reader if isinstance(path_or_reader, PackedReader) else open_packed(path_or_reader)
    meta = reader.meta
    if meta["kind"] != "detection":
        raise DataError(f"{reader.path} holds {meta['kind']} data: COCO ground truth needs detection data")
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(len(reader)):
        record = reader[index]
        images.append({
            "id": record["image_id"], "file_name": record["file_name"],
            "height": record["height"], "width": record["width"],
        })
        areas = record.get("area") or [b[2] * b[3] for b in record["boxes"]]
        difficult = record.get("difficult") or [0] * len(record["boxes"])
        for box, category, crowd, area, hard in zip(record["boxes"], record["category_ids"], record["iscrowd"],
                                                     areas, difficult):
            # A difficult box (VOC) is an ignore region, as a crowd is: a detection on it is
            # neither a true nor a false positive (COCOeval's `iscrowd` is its only ignore flag).
            annotations.append({
                "id": len(annotations) + 1, "image_id": record["image_id"], "category_id": category,
                "bbox": list(box), "area": float(area), "iscrowd": int(bool(crowd) or bool(hard)),
            })
    categories = meta.get("coco_categories") or [
        {"id": cid, "name": name} for cid, name in zip(meta["category_ids"], meta["classes"])
    ]
    return {"images": images, "annotations": annotations, "categories": categories}
