"""Label masks as packed: reading a source mask file into class indices, and writing the 8-bit
greyscale PNG that segmentation records hold (one class index per pixel, 255 = ignore).

Source masks come as greyscale ("L") or palette ("P") PNGs whose pixel values are class indices
(Pascal VOC's palette masks, Cityscapes' labelIds): the values are read as they are, never through
the palette's colours.
"""

from __future__ import annotations

import io

import numpy as np

from hatcli.data.source_files import IMAGE_MAGIC, header_size

_PNG_MAGIC = next(magic for magic, kind in IMAGE_MAGIC.items() if kind == "PNG")


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG mask's header, before any pixel is decoded; None when the bytes
    are not a readable PNG. Packers compare it with the image's size first, so that no mask larger
    than its image (which passed the pixel limit) is ever decoded."""
    return header_size(data, "PNG") if data.startswith(_PNG_MAGIC) else None


def read_mask(data: bytes) -> tuple[np.ndarray | None, str | None]:
    """The class indices of an encoded mask as uint8 [H, W], or (None, why it cannot be read)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in ("L", "P"):
                return None, (f"the mask is a {image.mode} image: a mask holds one class index per pixel "
                              "(an 8-bit greyscale or palette PNG)")
            values = np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return None, f"cannot decode the mask: {exc}"
    return values.astype(np.uint8, copy=False), None


def encode_mask(labels: np.ndarray) -> bytes:
    """The 8-bit greyscale PNG of a uint8 [H, W] label map (what a segmentation record stores)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), "L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def unknown_values(labels: np.ndarray, valid: np.ndarray) -> list[int]:
    """The values in `labels` for which the 256-entry bool table `valid` is False, sorted."""
    present = np.flatnonzero(np.bincount(labels.reshape(-1), minlength=256))
    return [int(v) for v in present if not valid[v]]
