"""VargNetV2 for hatcli: the `vargnet_v2` model family (variable group convolutions)."""
