"""A tiny network that holds every kind of observer `MarchQuantizer` inserts, for quantization tests."""

from __future__ import annotations

import torch
from torch import nn

from hatcli.family import ModelFamily


class TinyNet(nn.Module):
    """conv-BN-ReLU (unsigned activations), a residual conv (signed), add+ReLU, pool, linear: every
    kind of observer `MarchQuantizer` inserts, in a graph that exports in well under a second."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(y + self.branch(y))
        return self.head(torch.flatten(self.pool(y), 1))


class TinyFamily(ModelFamily):
    """Just enough of a family for `prepare_quantized`: it builds `TinyNet`."""

    name = "tiny_quant"
    task = "classification"

    def build_float_model(self, config, num_classes):
        return TinyNet()

    def loss(self, outputs, targets):
        raise NotImplementedError

    def predict(self, outputs, topk=5):
        raise NotImplementedError

    def draw_predictions(self, image, prediction, class_names):
        raise NotImplementedError


def rank_batches(rank: int, size: tuple[int, int], count: int = 2) -> list[torch.Tensor]:
    """Rank-dependent calibration data: rank r's inputs are (1 + 2r) times larger."""
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(8, 3, *size, generator=gen) * (1 + 2 * rank) for _ in range(count)]


def calibrate(prepared: torch.fx.GraphModule, batches: list[torch.Tensor]) -> None:
    """Run `batches` through a prepared graph with its observers on (the calibration stage's mode)."""
    from hatcli.quant.flow import set_mode

    set_mode(prepared, "calibrate")
    with torch.no_grad():
        for images in batches:
            prepared(images)


def run_two_ranks(main, folder) -> tuple[dict, dict]:
    """Spawn `main(rank, world_size, store, out)` as two gloo ranks; return what each saved to out/rank{r}.pt."""
    import torch.multiprocessing as mp

    mp.spawn(main, args=(2, str(folder / "store"), str(folder)), nprocs=2, join=True)
    return torch.load(folder / "rank0.pt"), torch.load(folder / "rank1.pt")
