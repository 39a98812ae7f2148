"""ResNet (He et al., 2016) in the layouts low-bit QAT research uses.

- ImageNet ResNet-18/34/50 exactly as torchvision builds them (7x7 stride-2 stem + max pool,
  BasicBlock or Bottleneck with the stride on the 3x3 conv, widths 64-128-256-512): at width 1
  with post-activation and conv shortcuts the state dict has torchvision's keys and parameter count.
- CIFAR ResNet-20/32/56 (He et al., 2016, section 4.2): 3x3 stem of 16 channels, three stages of
  (depth - 2) / 6 BasicBlocks with widths 16-32-64, global average pooling, fc.

Variants, each a constructor argument (`BlockSpec`):

- `order="pre"`: pre-activation (He et al., "Identity mappings in deep residual networks"): every
  conv is preceded by BN -> activation, the sum is not activated, the network ends with BN ->
  activation before pooling (`bn_final`, `act_final`) and the stem is the conv (+ max pool) alone.
  A projection shortcut then reads the pre-activated input and has no BN (as in the paper and in
  timm's ResNetV2): the branch it is added to ends in a bare conv too.
- `shortcut`: `"conv"` (option B: strided 1x1 conv + BN where the shape changes), `"avgpool"`
  (ResNet-D / Bi-Real: average pool with kernel = stride, `ceil_mode=True,
  count_include_pad=False`, then a stride-1 1x1 conv + BN) or `"pad"` (option A, He et al.'s
  CIFAR networks: the input subsampled by the stride and zero-padded in channels; no parameters).
- `bireal=True` (BasicBlock only): Bi-Real Net's per-conv shortcuts, every 3x3 conv with its BN has
  its own identity shortcut, the shape-changing shortcut sits on the block's first conv. With
  `order="post"` a unit is act(bn(conv(x)) + x); with `order="pre"` it is Bi-Real Net's own
  layout bn(conv(act(x))) + x (the identity carries the value before the activation, and the stem
  keeps its BN but has no activation).
- `activation`: `"relu"`, `"prelu"` (one slope per channel, as Bi-Real / ReActNet use),
  `"hardtanh"` (clamp to [-1, 1], BinaryNet's: signed, so a sign quantizer after it keeps +-1) or
  `"none"` (an `nn.Identity`: no nonlinearity anywhere, stem included, besides what fake
  quantizers add).

Every activation is a module of its own (`act1`, `act2`, ...; a PReLU has its own slopes), so every
activation has a module path; every shape-changing shortcut lives under a module called
`downsample`, so quantization patterns like `*downsample*` can single it out. No in-place ops and
no data-dependent control flow: the network exports with `torch.export`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hatcli.nn_init import init_conv_bn_

Order = Literal["post", "pre"]
Shortcut = Literal["conv", "avgpool", "pad"]
Activation = Literal["relu", "prelu", "hardtanh", "none"]
Stem = Literal["imagenet", "cifar"]

IMAGENET_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
"""ImageNet depths: block kind and blocks per stage (torchvision's `resnet18/34/50`)."""
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    d: ("basic", ((d - 2) // 6,) * 3) for d in (20, 32, 56)
}
"""CIFAR depths (6n + 2 layers): n BasicBlocks in each of three stages."""
CIFAR_WIDTHS = (16, 32, 64)
DEPTHS = (*IMAGENET_DEPTHS, *CIFAR_DEPTHS)


@dataclass(frozen=True)
class BlockSpec:
    """How every residual block is built (the `[model]` table's structure keys)."""

    order: Order = "post"
    shortcut: Shortcut = "conv"
    bireal: bool = False
    activation: Activation = "relu"


def scaled(channels: int, width: float) -> int:
    """`channels * width` rounded half up, at least 1."""
    return max(1, int(channels * width + 0.5))


def make_activation(kind: Activation, channels: int) -> nn.Module:
    """The activation module: ReLU (not in place), per-channel PReLU, Hardtanh(-1, 1) or the identity."""
    if kind == "relu":
        return nn.ReLU(inplace=False)
    if kind == "prelu":
        return nn.PReLU(channels)
    if kind == "hardtanh":  # BinaryNet's: keeps the sign of x, so a binary (sign) input stays +-1
        return nn.Hardtanh(-1.0, 1.0)
    return nn.Identity()


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """3x3 conv with padding 1 and no bias (a BN follows or precedes it)."""
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """1x1 conv without bias."""
    return nn.Conv2d(cin, cout, 1, stride, 0, bias=False)


class PadShortcut(nn.Module):
    """Option A shortcut: the input subsampled by `stride` and zero-padded to `cout` channels (the
    new channels split between both ends, as in He et al.'s CIFAR networks); no parameters."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if cout < cin:
            raise ValueError(f"a zero-padding shortcut cannot reduce {cin} channels to {cout}")
        self.stride = stride
        self.before = (cout - cin) // 2
        self.after = cout - cin - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subsample, then pad the channel axis with zeros."""
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))


def make_downsample(cin: int, cout: int, stride: int, kind: Shortcut, norm: bool) -> nn.Module | None:
    """The shortcut where a block changes the shape (None: the identity).

    `conv`: `[conv1x1(stride), BN]` (torchvision's `downsample.0/1`); `avgpool`:
    `[AvgPool2d or Identity, conv1x1, BN]` (timm's `downsample_avg`); `norm=False` drops the BN
    (pre-activation). `pad`: `PadShortcut`.
    """
    if stride == 1 and cin == cout:
        return None
    if kind == "pad":
        return PadShortcut(cin, cout, stride)
    layers: list[nn.Module] = []
    if kind == "avgpool":
        layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                      if stride > 1 else nn.Identity())
        layers.append(conv1x1(cin, cout))
    else:
        layers.append(conv1x1(cin, cout, stride))
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers)


def _shortcut(downsample: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if downsample is None else downsample(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs (the stride on the first) and a shortcut, in the order `spec` asks for."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, spec: BlockSpec) -> None:
        super().__init__()
        self.spec = spec
        cout = planes * self.expansion
        pre, bireal = spec.order == "pre", spec.bireal
        if pre and not bireal:  # BN -> act -> conv, twice
            self.bn1, self.act1 = nn.BatchNorm2d(cin), make_activation(spec.activation, cin)
            self.conv1 = conv3x3(cin, planes, stride)
            self.bn2, self.act2 = nn.BatchNorm2d(planes), make_activation(spec.activation, planes)
            self.conv2 = conv3x3(planes, cout)
        elif pre:  # Bi-Real Net: act -> conv -> BN, twice
            self.act1, self.conv1 = make_activation(spec.activation, cin), conv3x3(cin, planes, stride)
            self.bn1 = nn.BatchNorm2d(planes)
            self.act2, self.conv2 = make_activation(spec.activation, planes), conv3x3(planes, cout)
            self.bn2 = nn.BatchNorm2d(cout)
        else:  # conv -> BN -> act, twice (torchvision's module order)
            self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
            self.act1 = make_activation(spec.activation, planes)
            self.conv2, self.bn2 = conv3x3(planes, cout), nn.BatchNorm2d(cout)
            self.act2 = make_activation(spec.activation, cout)
        self.downsample = make_downsample(cin, cout, stride, spec.shortcut, norm=bireal or not pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block; no op writes into its input."""
        spec = self.spec
        if spec.bireal and spec.order == "pre":
            out = self.bn1(self.conv1(self.act1(x))) + _shortcut(self.downsample, x)
            return self.bn2(self.conv2(self.act2(out))) + out
        if spec.bireal:
            out = self.act1(self.bn1(self.conv1(x)) + _shortcut(self.downsample, x))
            return self.act2(self.bn2(self.conv2(out)) + out)
        if spec.order == "pre":
            pre = self.act1(self.bn1(x))
            identity = x if self.downsample is None else self.downsample(pre)
            out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
            return out + identity
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + _shortcut(self.downsample, x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride: torchvision's "ResNet v1.5"), 1x1 expand by 4, and a shortcut."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, spec: BlockSpec) -> None:
        super().__init__()
        if spec.bireal:
            raise ValueError("Bi-Real shortcuts need BasicBlocks (depth 18, 34, 20, 32 or 56)")
        self.spec = spec
        cout = planes * self.expansion
        act = spec.activation
        if spec.order == "pre":  # BN -> act -> conv, three times
            self.bn1, self.act1, self.conv1 = nn.BatchNorm2d(cin), make_activation(act, cin), conv1x1(cin, planes)
            self.bn2, self.act2 = nn.BatchNorm2d(planes), make_activation(act, planes)
            self.conv2 = conv3x3(planes, planes, stride)
            self.bn3, self.act3 = nn.BatchNorm2d(planes), make_activation(act, planes)
            self.conv3 = conv1x1(planes, cout)
        else:  # conv -> BN -> act, three times (torchvision's module order)
            self.conv1, self.bn1 = conv1x1(cin, planes), nn.BatchNorm2d(planes)
            self.act1 = make_activation(act, planes)
            self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
            self.act2 = make_activation(act, planes)
            self.conv3, self.bn3 = conv1x1(planes, cout), nn.BatchNorm2d(cout)
            self.act3 = make_activation(act, cout)
        self.downsample = make_downsample(cin, cout, stride, spec.shortcut, norm=spec.order == "post")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block; no op writes into its input."""
        if self.spec.order == "pre":
            pre = self.act1(self.bn1(x))
            identity = x if self.downsample is None else self.downsample(pre)
            out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
            return self.conv3(self.act3(self.bn3(out))) + identity
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + _shortcut(self.downsample, x))


class ResNet(nn.Module):
    """Stem, 4 (ImageNet depths) or 3 (CIFAR depths) stages `layer1`..., global pooling, fc."""

    def __init__(self, num_classes: int, depth: int = 18, width: float = 1.0, stem: Stem | None = None,
                 spec: BlockSpec = BlockSpec(), dropout: float = 0.0) -> None:
        super().__init__()
        if depth in IMAGENET_DEPTHS:
            (kind, counts), widths = IMAGENET_DEPTHS[depth], IMAGENET_WIDTHS
        elif depth in CIFAR_DEPTHS:
            (kind, counts), widths = CIFAR_DEPTHS[depth], CIFAR_WIDTHS
        else:
            raise ValueError(f"depth must be one of {', '.join(map(str, DEPTHS))}, got {depth}")
        block = BasicBlock if kind == "basic" else Bottleneck
        stem = stem or ("imagenet" if depth in IMAGENET_DEPTHS else "cifar")
        pre = spec.order == "pre"
        cin = scaled(widths[0], width)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, cin, 7, 2, 3, bias=False)
        else:
            self.conv1 = conv3x3(3, cin)
        # pre-activation: the first block's BN -> act does the stem's; Bi-Real: its act does
        self.bn1 = nn.BatchNorm2d(cin) if not pre or spec.bireal else nn.Identity()
        self.act1 = make_activation(spec.activation, cin) if not pre else nn.Identity()
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        for index, (count, channels) in enumerate(zip(counts, widths)):
            planes = scaled(channels, width)
            blocks = []
            for k in range(count):
                blocks.append(block(cin, planes, 2 if index > 0 and k == 0 else 1, spec))
                cin = planes * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.num_stages = len(counts)
        self.bn_final = nn.BatchNorm2d(cin) if pre else nn.Identity()
        self.act_final = make_activation(spec.activation, cin) if pre else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of NCHW images."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        x = self.avgpool(self.act_final(self.bn_final(x))).flatten(1)
        return self.fc(self.dropout(x))

    def standalone_norms(self) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of every BatchNorm that does not directly follow a conv: the
        pre-activation BNs at the start of each block (`layerI.J.bn1`) and `bn_final`."""
        found = [(block, "bn1") for block in self.modules() if isinstance(block, (BasicBlock, Bottleneck))
                 and block.spec.order == "pre" and not block.spec.bireal]
        if isinstance(self.bn_final, nn.BatchNorm2d):
            found.append((self, "bn_final"))
        return found

    def deploy_copy(self) -> ResNet:
        """A copy to quantize and deploy, computing what this network computes in eval mode.

        A BatchNorm after a conv is folded into it when the deploy graph is prepared; a
        pre-activation BN has no conv to fold into (it follows an add, a max pool, or a conv whose
        output the shortcut also reads), so here it becomes the depthwise 1x1 conv with bias that
        its eval-mode affine is (`y = x * weight / sqrt(var + eps) + bias - mean * weight /
        sqrt(var + eps)`): an op every march computes in integers (one weight per channel, exact
        on the per-channel int8 grid), which the activation after it fuses into. The module keeps
        its name (`layer1.0.bn1`), so name patterns still find it.
        """
        deploy = copy.deepcopy(self).eval()
        for parent, name in deploy.standalone_norms():
            setattr(parent, name, norm_as_conv(getattr(parent, name)))
        return deploy


@torch.no_grad()
def norm_as_conv(bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The depthwise 1x1 conv (with bias) that computes `bn` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features, bias=True)
    conv.weight.copy_(scale.reshape(-1, 1, 1, 1))
    conv.bias.copy_(bn.bias - bn.running_mean * scale)
    return conv.to(bn.weight.device)
