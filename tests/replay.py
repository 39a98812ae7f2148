"""Training-loop test doubles shared by the resume tests: a replayable loader and a Ctrl-C callback."""

from __future__ import annotations

import torch

from hatcli.engine.callbacks import Callback


class ReplayBatches:
    """A loader over fixed batches whose order depends on the epoch (the contract of the trainer's
    loaders: `set_epoch(epoch, skip_batches)` then iterate)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.epoch)).tolist()
        for i in order[self.skip:]:
            yield self.batches[i]
        self.skip = 0


class StopAt(Callback):
    """Press Ctrl-C once `step` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, loss: float) -> None:
        if trainer.step == self.step:
            raise KeyboardInterrupt
