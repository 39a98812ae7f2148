"""Which samples each process reads, in which order: a function of (seed, epoch) alone.

`EpochSampler` yields ``(epoch, index)`` keys. The packed datasets seed their random transforms
from that key (see `hatcli.data.datasets`), so an image's augmentation depends only on the
seed, the epoch and the image, never on the number of DataLoader workers, the number of
processes, or where a run was interrupted. That is what makes a resumed run (even after
``kill -9`` mid-epoch) continue exactly as the uninterrupted run would have, and what lets N
processes with batch B/N see the same global batches as one process with batch B:

- the epoch's order is one permutation drawn from ``(seed, epoch)``;
- with N processes, rank r takes positions r, r+N, r+2N, ... of it (for training, truncated
  to a multiple of N so that every rank runs the same number of steps), so the j-th batches of
  all ranks together are exactly the j-th global batch;
- `skip` drops the first samples of one epoch on resume.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of `n` samples in `epoch` (the same in every process)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class EpochSampler(Sampler[tuple[int, int]]):
    """Yield ``(epoch, index)`` keys of one rank's share of the data for the current epoch.

    `set_epoch(epoch, skip)` chooses the epoch (and how many of this rank's samples to skip,
    for a run resumed mid-epoch). `even` truncates the order to a multiple of `num_replicas`
    (training); without it ranks may get one sample more or less (evaluation, where every sample
    must be seen exactly once).
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0,
                 even: bool = True) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.even = even
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use `epoch`'s order from now on, skipping this rank's first `skip` samples."""
        self.epoch = epoch
        self.skip = skip

    def _indices(self) -> list[int]:
        order = epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else list(range(self.n))
        if self.even:
            order = order[: len(order) - len(order) % self.num_replicas]
        return order[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._indices()[self.skip:]:
            yield self.epoch, index

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.skip)
