"""ResNet model family for hatcli (ImageNet and CIFAR layouts, with structure variants for low-bit QAT)."""

__version__ = "0.1.0"
