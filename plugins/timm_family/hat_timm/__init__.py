"""The `timm` model family for hatcli: any classifier of timm's registry by name, built untrained."""

__version__ = "0.1.0"
