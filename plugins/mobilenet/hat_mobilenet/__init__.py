"""MobileNetV1 and MobileNetV2 model families for hatcli."""

__version__ = "0.1.0"
