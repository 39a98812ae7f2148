"""FCOS-EfficientNet-B0 detection family for hatcli (HAT's `fcos_efficientnetb0_mscoco`)."""

__version__ = "0.1.0"
