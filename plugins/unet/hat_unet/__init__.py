"""UNet for hatcli: the `unet` semantic segmentation family (a small encoder-decoder)."""

__version__ = "0.1.0"
