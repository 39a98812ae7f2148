"""What the model is fed, read from a recipe: the packed data's paths, the per-image and batch
transform specs, the colour space, and one image as the model receives it.

The same answers serve training (hatcli/engine/loaders.py builds the DataLoaders from them),
export (the manifest's input and `preprocess`) and `hat infer`, so what is trained on is what is
deployed and described.

Torch-free at import (torch and the transform builders are imported where a pipeline is built),
so that `hatcli.stages` can read data paths, and the deploy commands that take a bare ONNX model
run, without loading torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hatcli.recipe import LoadedRecipe

if TYPE_CHECKING:
    import torch


def data_path(lr: LoadedRecipe, split: str) -> Path:
    """Path of the packed database of `split` ("train" or "val")."""
    data = lr.recipe.data
    return Path(data.root) / (data.train if split == "train" else data.val)


def transform_specs(lr: LoadedRecipe, split: str) -> list[dict[str, Any]]:
    """The per-image transforms of `split`: the recipe's, or a Resize to `data.input_size`."""
    data = lr.recipe.data
    user = data.train_transforms if split == "train" else data.val_transforms
    return list(user) or [{"name": "Resize", "size": list(data.input_size)}]


def batch_specs(lr: LoadedRecipe) -> list[dict[str, Any]]:
    """The batch transforms: the recipe's `batch_transforms`, then ToFloat and Normalize."""
    data = lr.recipe.data
    return list(data.batch_transforms) + [
        {"name": "ToFloat"}, {"name": "Normalize", "mean": list(data.mean), "std": list(data.std)},
    ]


def input_color_space(lr: LoadedRecipe) -> str:
    """"YUV444" when the pipeline converts RGB to YUV444 (per image or per batch), else "RGB"."""
    specs = transform_specs(lr, "val") + batch_specs(lr)
    yuv = any(s.get("name") == "RGBToYUV444" or (s.get("name") == "ToTensor" and s.get("to_yuv")) for s in specs)
    return "YUV444" if yuv else "RGB"


def image_transform(lr: LoadedRecipe, split: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-image pipeline of `split` (runs in the DataLoader workers)."""
    from hatcli.data.transforms import build_transforms

    return build_transforms(transform_specs(lr, split), where=f"data.{split}_transforms")


def batch_transform(lr: LoadedRecipe) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batch pipeline (runs on the model's device)."""
    from hatcli.data.transforms import build_batch_transforms

    return build_batch_transforms(batch_specs(lr), where="data.batch_transforms")


def model_input(lr: LoadedRecipe, image: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """One decoded uint8 CHW image as the model receives it (a batch of one): both halves of the pipeline."""
    sample = image_transform(lr, "val")(image)
    return batch_transform(lr)(sample.unsqueeze(0).to(device))


def detection_model_input(lr: LoadedRecipe, image: torch.Tensor,
                          device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict[str, Any]]:
    """One decoded uint8 CHW image as a detection or segmentation model receives it (a batch of
    one), and the target that maps its detections or label map back onto the image (`image_box`,
    `orig_size`, `img_size`)."""
    import torch

    from hatcli.data.datasets import transform_detection

    h, w = int(image.shape[-2]), int(image.shape[-1])
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "image_box": torch.tensor([0.0, 0.0, float(w), float(h)]), "orig_size": (h, w)}
    sample, target = transform_detection(image_transform(lr, "val"), image, target)
    target["img_size"] = (int(sample.shape[-2]), int(sample.shape[-1]))
    return batch_transform(lr)(sample.unsqueeze(0).to(device)), target
