"""What every classification family shares: cross-entropy, top-k decoding and drawing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from hatcli.family import FamilyConfig, ModelFamily, TaskKind
from hatcli.metrics.classification import TopKAccuracy
from hatcli.tasks.drawing import class_name, readable_canvas


@dataclass
class TopK:
    """One image's top-k classes and their probabilities."""

    labels: list[int]
    scores: list[float]


class ClassificationFamily(ModelFamily):
    """Base for classification families: subclasses build the network, this does the rest."""

    task: ClassVar[TaskKind] = "classification"
    output_names: ClassVar[list[str]] = ["logits"]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
             config: FamilyConfig | None = None) -> torch.Tensor:
        """Cross-entropy on logits, with optional label smoothing."""
        return F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)

    def build_metric(self, dataset: Any, config: FamilyConfig | None = None) -> TopKAccuracy:
        """Top-1 / top-5 accuracy."""
        return TopKAccuracy()

    def predict(self, outputs: Any, topk: int = 5, config: FamilyConfig | None = None) -> list[TopK]:
        """Softmax the logits and keep the `topk` best classes of every image."""
        logits = torch.as_tensor(outputs)
        k = min(topk, logits.shape[-1])
        probs, labels = logits.float().softmax(-1).topk(k, dim=-1)
        return [TopK(labels=l.tolist(), scores=p.tolist()) for l, p in zip(labels, probs)]

    def describe_outputs(self, config: FamilyConfig, input_size: tuple[int, int],
                         num_classes: int) -> list[dict[str, Any]]:
        """Every output is a batch of logits, one column per class (what `predict` softmaxes)."""
        return [{"name": name, "what": "logits", "shape": ["N", num_classes],
                 "layout": "one row per image, one column per class in `classes` order",
                 "decode": "softmax over axis 1 gives probabilities; argmax (or top-k) gives the "
                           "index into `classes`"} for name in self.output_names]

    def draw_predictions(self, image: Image.Image, prediction: TopK, class_names: list[str]) -> Image.Image:
        """Return the image (enlarged to at least 320 px wide) with a top-k label panel."""
        canvas, _ = readable_canvas(image, Image.Resampling.NEAREST)
        font = ImageFont.load_default(size=max(12, canvas.width // 28))
        lines = [f"{class_name(class_names, l)}: {s * 100:.1f}%" for l, s in zip(prediction.labels, prediction.scores)]
        draw = ImageDraw.Draw(canvas, "RGBA")
        line_height = font.getbbox("Ag")[3] + 4
        width = max(draw.textlength(t, font=font) for t in lines) + 12
        draw.rectangle((0, 0, width, line_height * len(lines) + 8), fill=(0, 0, 0, 160))
        for i, text in enumerate(lines):
            colour = (255, 255, 0) if i == 0 else (255, 255, 255)
            draw.text((6, 4 + i * line_height), text, fill=colour, font=font)
        return canvas
