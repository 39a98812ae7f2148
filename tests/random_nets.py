"""A seeded generator of small random networks built from the ops the docs call integer, for the
property "the compiled artifact computes exactly what int_infer computes".

A network is a chain of blocks on an N x C x H x W tensor (convs of random kernel, stride, groups
and bias; BatchNorm; the fusable clamps; residual adds and subtractions; products; concatenations
of branches of different scales; max and average pools; nearest and bilinear resizes; table
functions after a pool) ending in a global pool and a linear layer, or in an output conv. Table
functions are never put right after a conv or an add: a march that fuses them there computes them
in float (see `hat check`), and that is not integer. On a march with int16, some blocks compute in
int16.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from hatcli.quant.march import SHIPPED_MARCHES as MARCH_NAMES, load_march
from hatcli.quant.pool_windows import output_size

CLAMPS = {
    "relu": lambda x: torch.relu(x), "relu6": F.relu6, "hardtanh": lambda x: F.hardtanh(x, -0.75, 1.25),
    "clamp": lambda x: torch.clamp(x, -0.5, 0.9), "clamp_min": lambda x: torch.clamp_min(x, 0.1),
}
TABLES = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "hardswish": F.hardswish, "silu": F.silu, "exp": torch.exp}


class _Block(nn.Module):
    """One step of a random network: `kind` names what `forward` does with its children."""

    def __init__(self, kind: str, params: dict, **children: nn.Module) -> None:
        super().__init__()
        self.kind, self.params = kind, params
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, kind = self.params, self.kind
        if kind == "conv":
            y = self.conv(x)
            y = self.bn(y) if hasattr(self, "bn") else y
            return CLAMPS[p["clamp"]](y) if p["clamp"] else y
        if kind in ("add", "sub"):
            y = self.branch(x) + x if kind == "add" else self.branch(x) - x
            return CLAMPS[p["clamp"]](y) if p["clamp"] else y
        if kind == "mul":
            return x * torch.sigmoid(F.max_pool2d(self.branch(x), 3, 1, 1))
        if kind == "cat":
            return self.fuse(torch.cat([self.branch(x), p["gain"] * x], 1))
        if kind == "max_pool":
            return F.max_pool2d(x, p["kernel"], p["stride"], p["kernel"] // 2)
        if kind == "avg_pool":
            return F.avg_pool2d(x, p["kernel"], p["stride"], p["padding"], p["ceil_mode"], p["count_include_pad"])
        if kind == "resize":
            return F.interpolate(x, scale_factor=p["factor"], mode=p["mode"],
                                 **({"align_corners": p["align_corners"]} if p["mode"] == "bilinear" else {}))
        if kind == "table":
            return TABLES[p["function"]](F.max_pool2d(x, 2, 1, 1)[..., 1:, 1:])
        raise ValueError(kind)


class RandomNet(nn.Module):
    """The blocks, then a head: global pool + linear, or an output conv."""

    def __init__(self, blocks: list[_Block], head: str, in_channels: int, channels: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, in_channels, 3, padding=1)
        self.blocks = nn.Sequential(*blocks)
        self.head_kind = head
        self.head = nn.Linear(channels, 5) if head == "linear" else nn.Conv2d(channels, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(self.stem(x))
        return self.head(y.mean((2, 3))) if self.head_kind == "linear" else self.head(y)


@dataclass
class RandomCase:
    """A random network, the march it is compiled for and the modules computed in int16."""

    seed: int
    net: RandomNet
    march: str
    int16: tuple[str, ...] = ()
    description: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"seed {self.seed} on {self.march} (int16: {list(self.int16)}): " + " -> ".join(self.description)


def _conv(rng: random.Random, channels: int, size: int) -> tuple[nn.Module, int, dict]:
    kernel = rng.choice([1, 3, 3, 5])
    stride = 2 if size >= 8 and rng.random() < 0.25 else 1
    out = rng.choice([channels, 2 * channels if channels < 16 else channels // 2])
    groups = rng.choice([1, 1, channels]) if out == channels else 1
    if groups > 1 and rng.random() < 0.5 and channels % 2 == 0:
        groups = 2
    conv = nn.Conv2d(channels, out, kernel, stride, kernel // 2, groups=groups, bias=rng.random() < 0.7)
    return conv, out, {"kernel": kernel, "stride": stride, "groups": groups}


def random_case(seed: int) -> RandomCase:
    """The network of `seed`: 2 to 6 blocks on a 16 x 16 input, a random march and, on a march
    with int16, sometimes a few int16 blocks."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    channels, size, blocks, description = rng.choice([4, 8]), 16, [], []
    first = channels
    for index in range(rng.randint(2, 6)):
        kind = rng.choice(["conv", "conv", "add", "sub", "mul", "cat", "max_pool", "avg_pool", "resize", "table"])
        if kind in ("max_pool", "avg_pool", "table") and size < 4:
            kind = "conv"
        if kind == "resize" and size > 16:
            kind = "conv"
        params: dict = {"in_channels": channels}
        if kind == "conv":
            conv, out, shape = _conv(rng, channels, size)
            params.update(shape, clamp=rng.choice([None, *CLAMPS]))
            children = {"conv": conv, **({"bn": nn.BatchNorm2d(out)} if rng.random() < 0.5 else {})}
            if "bn" in children:
                children["bn"].running_mean.uniform_(-0.3, 0.3)
                children["bn"].running_var.uniform_(0.5, 2.0)
            size = (size + 2 * (shape["kernel"] // 2) - shape["kernel"]) // shape["stride"] + 1
            channels = out
            description.append(f"conv{shape['kernel']}/s{shape['stride']}/g{shape['groups']}"
                               f"{'+bn' if 'bn' in children else ''}{'+' + params['clamp'] if params['clamp'] else ''}")
        elif kind in ("add", "sub"):
            params["clamp"] = rng.choice([None, "relu", "relu6", "hardtanh"])
            children = {"branch": nn.Conv2d(channels, channels, 3, padding=1)}
            description.append(kind + (f"+{params['clamp']}" if params["clamp"] else ""))
        elif kind == "mul":
            children = {"branch": nn.Conv2d(channels, channels, 1)}
            description.append("mul gate")
        elif kind == "cat":
            params["gain"] = rng.choice([1.0, 3.0])
            children = {"branch": nn.Conv2d(channels, channels, 3, padding=1),
                        "fuse": nn.Conv2d(2 * channels, channels, 1)}
            description.append(f"cat x{params['gain']:g}")
        elif kind == "max_pool":
            params.update(kernel=rng.choice([2, 3]), stride=2)
            children = {}
            size = (size + 2 * (params["kernel"] // 2) - params["kernel"]) // 2 + 1
            description.append(f"max_pool{params['kernel']}")
        elif kind == "avg_pool":
            kernel = rng.choice([2, 3])
            params.update(kernel=kernel, stride=rng.choice([1, 2]), padding=rng.choice([0, kernel // 2]),
                          ceil_mode=rng.random() < 0.3, count_include_pad=rng.random() < 0.7)
            children = {}
            size = output_size((size, size), (kernel, kernel), (params["stride"],) * 2, (params["padding"],) * 2,
                               params["ceil_mode"])[0]
            description.append(f"avg_pool{kernel}/s{params['stride']}/p{params['padding']}"
                               f"{'/ceil' if params['ceil_mode'] else ''}{'' if params['count_include_pad'] else '/valid'}")
        elif kind == "resize":
            params.update(mode=rng.choice(["nearest", "bilinear"]), factor=rng.choice([2, 2, 3, 1.5]),
                          align_corners=rng.random() < 0.3)
            children = {}
            size = int(size * params["factor"])
            description.append(f"{params['mode']} x{params['factor']:g}"
                               f"{' align_corners' if params['mode'] == 'bilinear' and params['align_corners'] else ''}")
        else:
            params["function"] = rng.choice(list(TABLES))
            children = {}
            description.append(params["function"])
        blocks.append(_Block(kind, params, **children))
    head = rng.choice(["linear", "conv"])
    description.append("linear head" if head == "linear" else "output conv")
    net = RandomNet(blocks, head, first, channels)
    march = rng.choice(MARCH_NAMES)
    int16: tuple[str, ...] = ()
    if load_march(march).quant.allow_int16 and rng.random() < 0.3:
        int16 = tuple(sorted({f"blocks.{rng.randrange(len(blocks))}*" for _ in range(rng.randint(1, 2))}))
    return RandomCase(seed, net, march, int16, description)
