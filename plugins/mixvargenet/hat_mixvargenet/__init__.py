"""MixVarGENet model family for hatcli."""

__version__ = "0.1.0"
