"""The FCOS-EfficientNet detector: backbone -> BiFPN -> FCOS head, returning a flat tuple of maps.

The forward returns the head's raw maps, in `output_names(levels)` order: every level's class
logits, then every level's box regression, then every level's centerness logits. Loss and
decoding live in `losses` / `decoder` and run outside the network, as on the device.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hat_fcos_efficientnet.backbone import EfficientNet
from hat_fcos_efficientnet.bifpn import BiFPN, NUM_LEVELS, OUT_STRIDES
from hat_fcos_efficientnet.head import FCOSHead


def output_names(levels: int = NUM_LEVELS) -> list[str]:
    """`cls_s8 .. cls_s128, bbox_s8 .. bbox_s128, ctr_s8 .. ctr_s128` for five levels."""
    strides = OUT_STRIDES[:levels]
    return [f"{kind}_s{s}" for kind in ("cls", "bbox", "ctr") for s in strides]


def level_shapes(input_size: tuple[int, int], levels: int = NUM_LEVELS) -> list[tuple[int, int]]:
    """(h, w) of every level's maps for an (H, W) input: every halving of the network (a stride-2
    conv with padding k // 2, or the 3 x 3 / stride-2 max pooling with padding 1) rounds up, so the
    stride-s maps are ceil(H / s) x ceil(W / s)."""
    h, w = input_size
    return [(-(-h // s), -(-w // s)) for s in OUT_STRIDES[:levels]]


class FcosEfficientNet(nn.Module):
    """EfficientNet backbone, BiFPN neck (strides 8 .. 128) and FCOS head, `channels` wide after the backbone."""

    def __init__(self, num_classes: int, width_mult: float = 1.0, depth_mult: float = 1.0, se: bool = False,
                 channels: int = 64, neck_layers: int = 3, separable: bool = True,
                 head_convs: int = 4, share_head: bool = True) -> None:
        super().__init__()
        self.backbone = EfficientNet(width_mult, depth_mult, se)
        # neck and head have one width (64 in HAT's B0 model), so no 1x1 adapter sits between them
        self.neck = BiFPN(self.backbone.out_channels, channels, neck_layers, separable)
        self.head = FCOSHead(num_classes, channels, head_convs, NUM_LEVELS, share_head)
        self.strides = list(OUT_STRIDES)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Raw head maps of a batch of NCHW images, as one flat tuple (see the module docstring)."""
        cls, bbox, ctr = self.head(self.neck(self.backbone(images)))
        return (*cls, *bbox, *ctr)

    def deploy_copy(self) -> FcosEfficientNet:
        """A copy of the network in its deployable form: the head unshared per level (same outputs)."""
        deploy = copy.deepcopy(self)
        deploy.head = self.head.unshared()
        return deploy
