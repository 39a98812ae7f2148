"""DataLoaders for a recipe: packed datasets, per-image transforms, and batch transforms on the device.

The input pipeline has two halves, as in HAT:

- per image, in the DataLoader workers: decode, then the recipe's `train_transforms` /
  `val_transforms` (geometry and colour augmentation), still uint8, so workers hand over a
  quarter of the bytes that float batches would take;
- per batch, on the device the model runs on (the GPU when there is one): the recipe's
  `batch_transforms` (e.g. `RGBToYUV444`), then `ToFloat` and `Normalize(data.mean, data.std)`:
  exactly what the deployed model receives.

`build_loader` returns a `DeviceLoader` that yields batches with both halves applied. Samples
are chosen by an `EpochSampler` (hatcli/engine/sampling.py): the order and the augmentations are
a function of (seed, epoch), sharded across processes under `torch.distributed`. What the
transforms are (and where the packed data lies) is read from the recipe by `hatcli.inputs`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from hatcli.data.datasets import collate_for, open_dataset
from hatcli.engine import distributed
from hatcli.engine.sampling import EpochSampler
from hatcli.errors import DataError
from hatcli.inputs import batch_transform, data_path, image_transform
from hatcli.recipe import LoadedRecipe


def build_dataset(lr: LoadedRecipe, split: str) -> Any:
    """Open the packed `split` with its per-image transforms; a missing database is a clear error."""
    path = data_path(lr, split)
    if not path.exists():
        raise DataError(f"packed data not found: {path}; create it with "
                        f"`hat pack shapes --target-data-dir {lr.recipe.data.root}` or set `data.root`")
    return open_dataset(path, image_transform(lr, split))


def _to_device(targets: Any, device: torch.device) -> Any:
    if isinstance(targets, torch.Tensor):
        return targets.to(device, non_blocking=True)
    if isinstance(targets, list):
        return [_to_device(t, device) for t in targets]
    if isinstance(targets, dict):
        return {k: _to_device(v, device) for k, v in targets.items()}
    return targets


class DeviceLoader:
    """A DataLoader whose batches are moved to `device` and passed through the batch transforms.

    Iterates as ``(images, targets)`` like the DataLoader it wraps; `dataset`, `sampler` and
    `len()` are the wrapped loader's. `set_epoch(epoch, skip_batches)` picks the epoch's order
    (and skips batches already trained on, when a run resumes mid-epoch).
    """

    def __init__(self, loader: DataLoader, batch: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str = "cpu") -> None:
        self.loader = loader
        self.batch = batch
        self.device = torch.device(device)

    @property
    def dataset(self) -> Any:
        """The packed dataset behind the loader."""
        return self.loader.dataset

    @property
    def sampler(self) -> Any:
        """The wrapped loader's sampler."""
        return self.loader.sampler

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Read `epoch`'s order from now on, leaving out its first `skip_batches` batches."""
        if isinstance(self.loader.sampler, EpochSampler):
            self.loader.sampler.set_epoch(epoch, skip_batches * (self.loader.batch_size or 1))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        for images, targets in self.loader:
            images = images.to(self.device, non_blocking=True)
            yield self.batch(images), _to_device(targets, self.device)


def build_loader(lr: LoadedRecipe, split: str, shuffle: bool | None = None, seed: int | None = None,
                 device: torch.device | str = "cpu") -> DeviceLoader:
    """Batches of `split` on `device`; training batches are shuffled by epoch from the recipe's seed.

    Under `torch.distributed` each rank reads its own shard (see `EpochSampler`); evaluation
    shards are disjoint and cover every sample once.
    """
    dataset = build_dataset(lr, split)
    data = lr.recipe.data
    shuffle = (split == "train") if shuffle is None else shuffle
    seed = lr.recipe.seed if seed is None else seed
    dataset.sample_seed = seed
    info = distributed.current()
    training = split == "train"
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, num_replicas=info.world_size,
                           rank=info.rank, even=training)
    collate = collate_for(getattr(dataset, "kind", ""))
    device = torch.device(device)
    per_rank = len(dataset) // info.world_size
    loader = DataLoader(dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.num_workers,
                        collate_fn=collate, drop_last=training and per_rank > data.batch_size,
                        generator=torch.Generator().manual_seed(seed),
                        persistent_workers=data.num_workers > 0, pin_memory=device.type == "cuda")
    return DeviceLoader(loader, batch_transform(lr), device)
