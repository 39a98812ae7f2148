"""What every semantic segmentation family shares: per-pixel cross-entropy, mIoU, label maps
mapped back onto the original image, and a coloured-mask drawing with a legend.

A segmentation family's deploy model returns one tensor of class logits, NCHW, at
`output_stride` times coarser than its input (1: the input's own resolution). The loss and the
metric upsample the logits bilinearly to the mask's size and take the arg-max there (as
mmsegmentation does); `predict` does the same at the model input's size and returns one
`SegmentationMap` per image, in model-input pixels. `to_original` maps a map onto the original
image through the `image_box` the dataset records (where the original image's corners landed
after resize, pad and flip), nearest-neighbour, so every pixel keeps a class index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from hatcli.data.datasets import batch_masks
from hatcli.data.lmdb_format import IGNORE_INDEX
from hatcli.data.palette import voc_colormap
from hatcli.family import FamilyConfig, ModelFamily, TaskKind
from hatcli.metrics.segmentation import ConfusionMatrix
from hatcli.tasks.drawing import class_name, readable_canvas


@dataclass
class SegmentationMap:
    """One image's predicted classes: `labels` int64 [H, W] (0 .. C-1) and `confidence` [H, W]
    (the winning class's softmax probability)."""

    labels: torch.Tensor
    confidence: torch.Tensor

    def class_shares(self) -> list[tuple[int, float]]:
        """(class, share of the pixels) of every class present, largest first."""
        counts = torch.bincount(self.labels.reshape(-1))
        total = max(1, int(counts.sum()))
        present = [(c, int(n) / total) for c, n in enumerate(counts.tolist()) if n]
        return sorted(present, key=lambda item: -item[1])


def the_logits(outputs: Any) -> torch.Tensor:
    """The logits tensor of a segmentation model's outputs ([N, C, h, w], or a 1-tuple of it)."""
    return torch.as_tensor(outputs[0] if isinstance(outputs, (tuple, list)) else outputs)


def logits_at(outputs: Any, size: tuple[int, int]) -> torch.Tensor:
    """The logits (`outputs`, [N, C, h, w] or a 1-tuple of it) resized bilinearly to `size`
    (H, W); unchanged when they already have it."""
    logits = the_logits(outputs)
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


def to_original(prediction: SegmentationMap, target: dict[str, Any]) -> SegmentationMap:
    """Map a label map from model-input pixels onto the original image (`target["orig_size"]`),
    through `target["image_box"]` (the original image's extent in input pixels; a flip swaps its
    corners): each original pixel takes the class of the input pixel its centre falls in."""
    height, width = target["orig_size"]
    box = torch.as_tensor(target["image_box"], dtype=torch.float64).reshape(4)
    in_h, in_w = prediction.labels.shape[-2:]
    xs = box[0] + (torch.arange(width, dtype=torch.float64) + 0.5) * (box[2] - box[0]) / width
    ys = box[1] + (torch.arange(height, dtype=torch.float64) + 0.5) * (box[3] - box[1]) / height
    cols = xs.floor().long().clamp(0, in_w - 1)
    rows = ys.floor().long().clamp(0, in_h - 1)
    return SegmentationMap(prediction.labels[rows][:, cols], prediction.confidence[rows][:, cols])


class SegmentationMetric:
    """mIoU, pixel accuracy and per-class IoU of a segmentation family's raw outputs over packed
    segmentation data (ignore-index pixels count nowhere); under `torch.distributed` the
    confusion matrices of all ranks are summed before `compute`."""

    def __init__(self, dataset: Any) -> None:
        self.classes = list(dataset.classes)
        self.matrix = ConfusionMatrix(len(self.classes), int(getattr(dataset, "ignore_index", IGNORE_INDEX)))

    def update(self, outputs: Any, targets: list[dict[str, Any]]) -> None:
        """Add one batch of raw outputs and its targets."""
        masks = batch_masks(targets)
        logits = logits_at(outputs, tuple(masks.shape[-2:]))
        self.matrix.update(logits.argmax(1).cpu(), masks.cpu())

    def merge_across_ranks(self) -> None:
        """Give every rank the sum of all ranks' pixel counts (no-op in a single process)."""
        self.matrix.merge_across_ranks()

    def compute(self) -> dict[str, float]:
        """`{"mIoU", "pixel_acc", "mean_acc"}` in percent."""
        return self.matrix.compute()

    def per_class(self) -> tuple[str, dict[str, float | None]]:
        """("IoU", every class's IoU in percent by name; None: the class occurred nowhere)."""
        return "IoU", dict(zip(self.classes, self.matrix.class_iou()))


class SegmentationFamily(ModelFamily):
    """Base for semantic segmentation families: subclasses build the network, this does the rest."""

    task: ClassVar[TaskKind] = "segmentation"
    output_names: ClassVar[list[str]] = ["logits"]
    output_stride: ClassVar[int] = 1
    """How much coarser than the input the deploy model's logits are (1, 2, 4, 8, ...); a family
    whose stride is a `[model]` setting overrides `stride_of` instead."""

    def stride_of(self, config: FamilyConfig | None) -> int:
        """The logits' stride for the recipe's `[model]` table (default: `output_stride`)."""
        return self.output_stride

    def loss(self, outputs: Any, targets: list[dict[str, Any]], label_smoothing: float = 0.0,
             config: FamilyConfig | None = None) -> torch.Tensor:
        """Per-pixel cross-entropy (ignore-index pixels left out) of the logits upsampled to the masks."""
        masks = batch_masks(targets, device=the_logits(outputs).device)
        logits = logits_at(outputs, tuple(masks.shape[-2:]))
        return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)

    def build_metric(self, dataset: Any, config: FamilyConfig | None = None) -> SegmentationMetric:
        """mIoU over the packed segmentation `dataset`."""
        return SegmentationMetric(dataset)

    def predict(self, outputs: Any, topk: int = 1, config: FamilyConfig | None = None) -> list[SegmentationMap]:
        """Upsample the logits by the stride (`stride_of`) and take every pixel's most likely class (`topk`
        is not used: a map holds one class per pixel)."""
        logits = the_logits(outputs)
        stride = self.stride_of(config)
        size = (logits.shape[-2] * stride, logits.shape[-1] * stride)
        probs = logits_at(logits, size).float().softmax(1)
        confidence, labels = probs.max(1)
        return [SegmentationMap(l.cpu(), c.cpu()) for l, c in zip(labels, confidence)]

    def describe_outputs(self, config: FamilyConfig, input_size: tuple[int, int],
                         num_classes: int) -> list[dict[str, Any]]:
        """The one output is a map of class logits at the stride (`stride_of`) of the input."""
        s = self.stride_of(config)
        return [{"name": name, "what": "per-pixel class logits",
                 "shape": ["N", num_classes, input_size[0] // s, input_size[1] // s], "layout": "NCHW",
                 "stride": s,
                 "decode": (f"resize H, W by {s} (bilinear, half-pixel centres) when the stride is above 1, "
                            "then argmax over axis 1 gives each pixel's index into `classes`; undo "
                            "`preprocess` (crop off the bottom/right pad, resize nearest) to reach the "
                            "original image")}
                for name in self.output_names]

    def draw_predictions(self, image: Image.Image, prediction: SegmentationMap, class_names: list[str],
                         palette: list[tuple[int, int, int]] | None = None, alpha: float = 0.55) -> Image.Image:
        """Return the image (enlarged to at least 320 px wide) with each pixel tinted by its class
        colour (a class coloured black, the background, is not tinted) and a legend of the classes present with their share of the image. `prediction` is in
        original-image pixels; `palette` has one RGB triple per class (default: VOC's colour map)."""
        colours = list(palette or []) + voc_colormap(max(len(class_names), int(prediction.labels.max()) + 1)
                                                     )[len(palette or []):]
        canvas, _ = readable_canvas(image, Image.Resampling.BILINEAR)
        table = torch.tensor(colours, dtype=torch.uint8)
        coloured = table[prediction.labels.clamp(0, len(colours) - 1)]
        overlay = Image.fromarray(coloured.numpy(), "RGB").resize(canvas.size, Image.Resampling.NEAREST)
        # a class drawn in black (VOC's and shapes' background) leaves its pixels as they are
        tinted = Image.fromarray(((coloured.sum(-1) > 0).to(torch.uint8) * 255).numpy(), "L")
        canvas.paste(Image.blend(canvas, overlay, alpha), mask=tinted.resize(canvas.size, Image.Resampling.NEAREST))
        font = ImageFont.load_default(size=max(11, canvas.width // 40))
        draw = ImageDraw.Draw(canvas, "RGBA")
        line_height = font.getbbox("Ag")[3] + 4
        rows = [(c, f"{class_name(class_names, c)} {share * 100:.0f}%") for c, share in prediction.class_shares()[:12]]
        width = max(draw.textlength(text, font=font) for _, text in rows) + line_height + 14
        draw.rectangle((0, 0, width, line_height * len(rows) + 8), fill=(0, 0, 0, 170))
        for i, (c, text) in enumerate(rows):
            top = 4 + i * line_height
            draw.rectangle((6, top + 2, 6 + line_height - 4, top + line_height - 2), fill=colours[c],
                           outline=(255, 255, 255))
            draw.text((line_height + 8, top), text, fill=(255, 255, 255), font=font)
        return canvas
