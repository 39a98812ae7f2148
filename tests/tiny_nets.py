"""A tiny network that holds every kind of observer `MarchQuantizer` inserts, for quantization tests."""

from __future__ import annotations

import torch
from torch import nn

from hatcli.tasks.classification import ClassificationFamily


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


class TinyFamily(ClassificationFamily):
    """Just enough of a family for `prepare_quantized`: it builds `TinyNet`."""

    name = "tiny_quant"

    def build_float_model(self, config, num_classes):
        return TinyNet()


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


class Fn(nn.Module):
    """Wraps a function of the input (and of this module's children) as a module, so that the
    ops it produces carry this module's name (what `quant.int16` patterns match)."""

    def __init__(self, fn, **children: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


class OpNet(nn.Module):
    """A signed conv stem, the op pattern under test (`op`), then flatten: the pattern sits between
    two quantized tensors, and the flattened output keeps the pattern's output scale."""

    def __init__(self, op: nn.Module, channels: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)  # no int32 bias rounding before `op`
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.op(self.stem(x)), 1)


class MiniEfficientDet(nn.Module):
    """The ops of EfficientNet-B0 + FPN + FCOS in a few layers: conv-BN-SiLU, depthwise, squeeze-
    excite (mean, SiLU, sigmoid, mul), residual add, nearest / bilinear upsample, cat, a head with
    a learnable scale and exp, and optionally a third output through float-only ops (GroupNorm, erf)."""

    def __init__(self, float_ops: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.BatchNorm2d(8), nn.SiLU())
        self.se_reduce, self.se_expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.project = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.SiLU())
        self.lateral = nn.Conv2d(8, 8, 1)
        self.norm, self.aux = nn.GroupNorm(2, 16), nn.Conv2d(16, 2, 1)
        self.cls, self.reg = nn.Conv2d(16, 3, 3, 1, 1), nn.Conv2d(16, 4, 3, 1, 1)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.float_ops = float_ops

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        import torch.nn.functional as F

        x = self.stem(x)
        y = self.dw(x)
        s = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        y = self.project(y * s) + x
        p4 = self.down(y)
        p3 = self.lateral(y) + F.interpolate(p4, scale_factor=2, mode="nearest")
        h = torch.relu(torch.cat([p3, F.interpolate(p4, scale_factor=2, mode="bilinear")], 1))
        outputs = (self.cls(h), torch.exp(self.scale * self.reg(h)))
        if self.float_ops:  # a branch of its own, so the outputs above stay integer-exact
            outputs += (self.aux(torch.erf(self.norm(h))),)
        return outputs
