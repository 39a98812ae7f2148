"""Weight initialisation that the bundled (and any third-party) CNN families can share."""

from __future__ import annotations

from torch import nn


def init_conv_bn_(model: nn.Module) -> None:
    """Initialise every Conv2d of `model` He-normal (fan-out, ReLU gain) with zero biases, and
    every BatchNorm2d to the identity (weight 1, bias 0), in place: the scheme torchvision's and
    HAT's CNNs start from."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
