"""FCOS head (Tian et al., 2019): a classification and a regression tower per level, three outputs.

Each tower is `convs` 3x3 convs of `channels` channels with BatchNorm and ReLU. The class
logits come from the classification tower, the box regression (ltrb distances in units of the
level's stride, before the ReLU: the decoder applies ``relu(x) * stride``) and the centerness
logit from the regression tower (FCOS's "centerness on reg"). No activation, scale or stride
multiply follows the output convs: the deploy graph ends with them, so each output is an int32
accumulator dequantized to float (HAT's `int8_output=False, dequant_output=True`).

With `share=True` (FCOS's default) the conv weights are shared by all levels and each level has
its own BatchNorm, as in EfficientDet; `unshared()` gives the per-level copy that is deployed
(HAT's `deepcopy_share_conv`): each level's conv then folds its own BatchNorm, which shared weights
cannot, and QAT fine-tunes the levels separately.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PRIOR_PROBABILITY = 0.01
"""Initial foreground probability of the class logits (RetinaNet / FCOS bias initialisation)."""


def _conv(cin: int, cout: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)


class FCOSHead(nn.Module):
    """The FCOS head over `levels` maps of `channels` channels.

    `forward(features)` returns ``(cls per level, bbox per level, centerness per level)`` as three
    lists: [N, num_classes, H, W], [N, 4, H, W] and [N, 1, H, W].
    """

    def __init__(self, num_classes: int, channels: int = 64, convs: int = 4, levels: int = 5,
                 share: bool = True) -> None:
        super().__init__()
        self.num_classes, self.channels, self.convs, self.levels, self.share = num_classes, channels, convs, levels, share
        sets = 1 if share else levels
        self.cls_convs = nn.ModuleList(nn.ModuleList(_conv(channels, channels, False) for _ in range(convs))
                                       for _ in range(sets))
        self.reg_convs = nn.ModuleList(nn.ModuleList(_conv(channels, channels, False) for _ in range(convs))
                                       for _ in range(sets))
        self.cls_norms = nn.ModuleList(nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(convs))
                                       for _ in range(levels))
        self.reg_norms = nn.ModuleList(nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(convs))
                                       for _ in range(levels))
        self.cls_out = nn.ModuleList(_conv(channels, num_classes, True) for _ in range(sets))
        self.bbox_out = nn.ModuleList(_conv(channels, 4, True) for _ in range(sets))
        self.ctr_out = nn.ModuleList(_conv(channels, 1, True) for _ in range(sets))
        self.relu = nn.ReLU(inplace=True)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for conv in self.cls_out:
            nn.init.constant_(conv.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
        for conv in self.bbox_out:
            # distances start positive (one stride), so the ReLU of the decoder passes gradients
            nn.init.constant_(conv.bias, 1.0)

    def _tower(self, x: torch.Tensor, convs: nn.ModuleList, norms: nn.ModuleList) -> torch.Tensor:
        for conv, norm in zip(convs, norms):
            x = self.relu(norm(conv(x)))
        return x

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Class logits, box regression and centerness logits of every level."""
        cls, bbox, ctr = [], [], []
        for level, x in enumerate(features):
            s = 0 if self.share else level
            c = self._tower(x, self.cls_convs[s], self.cls_norms[level])
            r = self._tower(x, self.reg_convs[s], self.reg_norms[level])
            cls.append(self.cls_out[s](c))
            bbox.append(self.bbox_out[s](r))
            ctr.append(self.ctr_out[s](r))
        return cls, bbox, ctr

    def unshared(self) -> FCOSHead:
        """A per-level copy computing the same function, every conv its own module (for deployment)."""
        copy = FCOSHead(self.num_classes, self.channels, self.convs, self.levels, share=False)
        copy.cls_norms.load_state_dict(self.cls_norms.state_dict())
        copy.reg_norms.load_state_dict(self.reg_norms.state_dict())
        for level in range(self.levels):
            s = 0 if self.share else level
            for name in ("cls_convs", "reg_convs", "cls_out", "bbox_out", "ctr_out"):
                getattr(copy, name)[level].load_state_dict(getattr(self, name)[s].state_dict())
        return copy.to(next(self.parameters()).device).train(self.training)
