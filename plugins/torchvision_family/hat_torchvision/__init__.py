"""The `torchvision` model family for hatcli: any classifier of torchvision.models by name, built untrained."""

__version__ = "0.1.0"
