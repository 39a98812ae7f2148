"""DataLoaders for a recipe: packed datasets + the recipe's transforms + normalization."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from hatcli.data.datasets import open_dataset
from hatcli.data.transforms import build_transforms
from hatcli.errors import DataError
from hatcli.recipe import LoadedRecipe


def data_path(lr: LoadedRecipe, split: str) -> Path:
    """Path of the packed database of `split` ("train" or "val")."""
    data = lr.recipe.data
    return Path(data.root) / (data.train if split == "train" else data.val)


def transform_specs(lr: LoadedRecipe, split: str) -> list[dict[str, Any]]:
    """The recipe's transforms for `split`, then ToFloat and Normalize (what the device receives)."""
    data = lr.recipe.data
    user = data.train_transforms if split == "train" else data.val_transforms
    specs = list(user) or [{"name": "Resize", "size": list(data.input_size)}]
    return specs + [{"name": "ToFloat"}, {"name": "Normalize", "mean": list(data.mean), "std": list(data.std)}]


def build_dataset(lr: LoadedRecipe, split: str) -> Any:
    """Open the packed `split` with its transforms; a missing database is a clear error."""
    path = data_path(lr, split)
    if not path.exists():
        raise DataError(f"packed data not found: {path}; create it with "
                        f"`hat pack shapes --target-data-dir {lr.recipe.data.root}` or set `data.root`")
    where = f"data.{split}_transforms"
    return open_dataset(path, build_transforms(transform_specs(lr, split), where=where))


def build_loader(lr: LoadedRecipe, split: str, shuffle: bool | None = None, seed: int | None = None) -> DataLoader:
    """DataLoader over `split`; training batches are shuffled with a seeded generator."""
    dataset = build_dataset(lr, split)
    data = lr.recipe.data
    shuffle = (split == "train") if shuffle is None else shuffle
    generator = torch.Generator().manual_seed(lr.recipe.seed if seed is None else seed)
    return DataLoader(dataset, batch_size=data.batch_size, shuffle=shuffle, num_workers=data.num_workers,
                      drop_last=split == "train" and len(dataset) > data.batch_size, generator=generator,
                      persistent_workers=data.num_workers > 0)
