"""The image transforms themselves, and the colour conversions they use.

Each class is a `torchvision.transforms.v2.Transform` on uint8 (or float 0..255) CHW images, or
NCHW batches for the batch-capable ones, moving `tv_tensors.BoundingBoxes` with the image where
the transform is geometric. `hatcli.data.transforms` exposes them to recipes by name, with
argument checking.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import is_pure_tensor

from hatcli.data.lmdb_format import IGNORE_INDEX


def _unwrap(inpt: Any) -> torch.Tensor:
    """The plain tensor behind a tv_tensor (or the tensor itself)."""
    return inpt.as_subclass(torch.Tensor)


def _rewrap(output: torch.Tensor, like: Any) -> Any:
    """Give `output` the tv_tensor type of `like` (an Image stays an Image), else return it as is."""
    return tv_tensors.wrap(output, like=like) if isinstance(like, tv_tensors.TVTensor) else output


# -- colour conversions ------------------------------------------------------------------------


_YUV_MATRIX = torch.tensor([
    [0.299, 0.587, 0.114],
    [-0.168736, -0.331264, 0.5],
    [0.5, -0.418688, -0.081312],
])
_YUV_OFFSET = torch.tensor([0.0, 128.0, 128.0])


def rgb_to_yuv444(rgb: torch.Tensor, round_to_uint8: bool = True) -> torch.Tensor:
    """RGB (0..255, any dtype, shape (..., 3, H, W)) -> float32 YUV444, BT.601 full range.

    With `round_to_uint8` the result is rounded and clamped to 0..255, i.e. the 8-bit YUV the
    device's camera pipeline hands the model. Runs on the input's device.
    """
    x = rgb.to(torch.float32)
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"RGB -> YUV444 needs 3 channels in dim -3, got shape {tuple(x.shape)}")
    matrix, offset = _YUV_MATRIX.to(x.device), _YUV_OFFSET.to(x.device)
    yuv = torch.einsum("ij,...jhw->...ihw", matrix, x) + offset[:, None, None]
    if round_to_uint8:
        yuv = yuv.round().clamp(0, 255)
    return yuv


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """Float RGB in [0, 1], shape (..., 3, H, W) -> HSV, each channel in [0, 1] (hue in [0, 1)).

    Vectorized (no per-pixel Python); grey pixels get hue 0 and saturation 0.
    """
    r, g, b = rgb.unbind(-3)
    maxc = rgb.amax(-3)
    minc = rgb.amin(-3)
    delta = maxc - minc
    chromatic = delta > 0
    safe_delta = torch.where(chromatic, delta, torch.ones_like(delta))
    safe_max = torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    saturation = torch.where(maxc > 0, delta / safe_max, torch.zeros_like(maxc))
    hue = torch.where(
        r == maxc, (g - b) / safe_delta,
        torch.where(g == maxc, 2.0 + (b - r) / safe_delta, 4.0 + (r - g) / safe_delta),
    )
    hue = torch.where(chromatic, torch.remainder(hue / 6.0, 1.0), torch.zeros_like(hue))
    return torch.stack([hue, saturation, maxc], dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV in [0, 1] (hue wraps around), shape (..., 3, H, W) -> float RGB in [0, 1]; inverse of `rgb_to_hsv`."""
    h, s, v = hsv.unbind(-3)
    h6 = torch.remainder(h, 1.0) * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    sector = sector.to(torch.int64) % 6  # h6 may round up to exactly 6.0
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    # For sector i = 0..5, (r, g, b) is (v,t,p), (q,v,p), (p,v,t), (p,q,v), (t,p,v), (v,p,q).
    index = sector.unsqueeze(-3)
    r = torch.stack([v, q, p, p, t, v], dim=-3).gather(-3, index)
    g = torch.stack([t, v, v, q, p, p], dim=-3).gather(-3, index)
    b = torch.stack([p, p, t, v, v, q], dim=-3).gather(-3, index)
    return torch.cat([r, g, b], dim=-3)


# -- transform classes -------------------------------------------------------------------------


class ToFloat(v2.Transform):
    """uint8 image -> float32 with values kept on the 0..255 scale (no division by 255).

    Works on a CHW image or an NCHW batch, on the tensor's device.
    """

    _transformed_types = (tv_tensors.Image, is_pure_tensor)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Convert one image (or batch) tensor."""
        return inpt.to(torch.float32)


class RGBToYUV444(v2.Transform):
    """RGB -> YUV 4:4:4, BT.601 full range (JPEG/JFIF), as the device's input pipeline expects.

    Works on 0..255 values (uint8 is converted first) and returns float32. By default the result
    is rounded and clamped to 0..255, since the device receives 8-bit YUV. Works on a CHW image or
    an NCHW batch, on the tensor's device.
    """

    _transformed_types = (tv_tensors.Image, is_pure_tensor)

    def __init__(self, round_to_uint8: bool = True) -> None:
        super().__init__()
        self.round_to_uint8 = round_to_uint8

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Convert one CHW (or NCHW) RGB tensor."""
        return _rewrap(rgb_to_yuv444(_unwrap(inpt), self.round_to_uint8), inpt)


class ToTensor(v2.Transform):
    """uint8 image -> float32 on the 0..255 scale, optionally converted RGB -> YUV444 on the way.

    Unlike torchvision's ToTensor this does not divide by 255: the device sees 0..255 values.
    With ``to_yuv`` the result equals `RGBToYUV444` (rounded, clamped to 0..255). Boxes pass
    through. Works on a CHW image or an NCHW batch, on the tensor's device.
    """

    _transformed_types = (tv_tensors.Image, is_pure_tensor)

    def __init__(self, to_yuv: bool = False) -> None:
        super().__init__()
        self.to_yuv = to_yuv

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Convert one CHW (or NCHW) tensor."""
        x = _unwrap(inpt).to(torch.float32)
        if self.to_yuv:
            x = rgb_to_yuv444(x, round_to_uint8=True)
        return _rewrap(x, inpt)


class Normalize(v2.Transform):
    """(x - mean) / std per channel, on the input's own scale (0..255 after ToFloat).

    Same values as `torchvision.transforms.v2.Normalize`, but uint8 input is converted to float32
    first, and it works on a CHW image or an NCHW batch on any device (the constants follow the
    input's device and dtype).
    """

    _transformed_types = (tv_tensors.Image, is_pure_tensor)

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.mean = list(mean)
        self.std = list(std)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Normalize one CHW (or NCHW) tensor."""
        x = _unwrap(inpt)
        if not x.is_floating_point():
            x = x.to(torch.float32)
        if x.ndim < 3 or x.shape[-3] != len(self.mean):
            raise ValueError(f"Normalize needs {len(self.mean)} channels in dim -3, got shape {tuple(x.shape)}")
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return _rewrap((x - mean) / std, inpt)


def _round_side(x: float) -> int:
    """int(x + 0.5), at least 1: how Resize rounds scaled sides."""
    return max(1, int(x + 0.5))


class Resize(v2.Transform):
    """Resize the image (and its boxes, masks) with an optional random scale and kept aspect ratio.

    - ``size`` int: the shorter side becomes ``size`` (aspect ratio kept, as torchvision does).
    - ``size`` [h, w]: exactly h x w; with ``keep_ratio`` a single factor
      ``min(max(h, w) / max(H, W), min(h, w) / min(H, W))`` instead (mmdet's "rescale": the long
      side fits in max(h, w) and the short side in min(h, w)), output sides ``int(side*factor + 0.5)``.
    - ``ratio_range`` [a, b]: each call first multiplies the target (h, w), or the int, by a
      ratio drawn uniformly from [a, b] with torch's global RNG, rounding with ``int(x + 0.5)``.
    """

    def __init__(
        self, size: int | list[int], keep_ratio: bool = False,
        ratio_range: tuple[float, float] | None = None, antialias: bool = True,
    ) -> None:
        super().__init__()
        if keep_ratio and isinstance(size, int):
            raise ValueError("keep_ratio needs size = [height, width]")
        self.size = size
        self.keep_ratio = keep_ratio
        self.ratio_range = ratio_range
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the ratio (if any) and work out the output size for this call."""
        ratio = 1.0
        if self.ratio_range is not None:
            low, high = self.ratio_range
            ratio = float(torch.empty(()).uniform_(low, high))
        if isinstance(self.size, int):
            side = self.size if self.ratio_range is None else _round_side(self.size * ratio)
            return {"size": [side]}  # torchvision: shorter side = side
        h, w = self.size
        if self.ratio_range is not None:
            h, w = _round_side(h * ratio), _round_side(w * ratio)
        if not self.keep_ratio:
            return {"size": [h, w]}
        height, width = v2.query_size(flat_inputs)
        factor = min(max(h, w) / max(height, width), min(h, w) / min(height, width))
        return {"size": [_round_side(height * factor), _round_side(width * factor)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Resize one image, box set or mask to the size chosen for this call."""
        return F.resize(inpt, params["size"], antialias=self.antialias)


class Pad(v2.Transform):
    """Pad at the bottom and right only, so box coordinates stay as they are.

    Either to the next multiple of ``size_divisor`` in both height and width, or to exactly
    ``size`` (h, w); an image larger than ``size`` is a ValueError. Padded pixels are ``fill``, and
    `IGNORE_INDEX` (255) in a segmentation mask: padding belongs to no class.
    """

    def __init__(
        self, size_divisor: int | None = None, size: tuple[int, int] | None = None,
        fill: float | list[float] = 0,
    ) -> None:
        super().__init__()
        if (size_divisor is None) == (size is None):
            raise ValueError("give exactly one of size_divisor or size")
        self.size_divisor = size_divisor
        self.size = size
        self.fill = fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Work out how much to add at the bottom and right of this input."""
        height, width = v2.query_size(flat_inputs)
        if self.size_divisor is not None:
            d = self.size_divisor
            out_h, out_w = -(-height // d) * d, -(-width // d) * d
        else:
            out_h, out_w = self.size  # type: ignore[misc]
            if height > out_h or width > out_w:
                raise ValueError(
                    f"Pad: image of size {height}x{width} is larger than size = [{out_h}, {out_w}]; "
                    "resize it first or pad to a larger size"
                )
        return {"padding": [0, 0, out_w - width, out_h - height]}  # left, top, right, bottom

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Pad one image, box set (canvas only) or mask."""
        if not any(params["padding"]):
            return inpt
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else self.fill
        return F.pad(inpt, params["padding"], fill=fill)


class RandomFlip(v2.Transform):
    """Flip left-right with probability ``px`` and upside-down with probability ``py``; boxes follow.

    Both coins are tossed on every call (torch's global RNG), so seeding reproduces the flips.
    """

    def __init__(self, px: float = 0.5, py: float = 0.0) -> None:
        super().__init__()
        self.px = px
        self.py = py

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Toss the two coins for this call."""
        coins = torch.rand(2)
        return {"horizontal": bool(coins[0] < self.px), "vertical": bool(coins[1] < self.py)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Flip one image, box set or mask as decided for this call."""
        if params["horizontal"]:
            inpt = F.horizontal_flip(inpt)
        if params["vertical"]:
            inpt = F.vertical_flip(inpt)
        return inpt


class AugmentHSV(v2.Transform):
    """YOLO-style colour jitter: random gains on hue, saturation and value.

    Each call draws ``r = uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1``; hue (in [0, 1)) is
    multiplied by r[0] and wraps around, saturation and value are multiplied by r[1], r[2] and
    clamped to [0, 1]. uint8 RGB in gives uint8 out (rounded); float 0..255 in gives float out.
    With all gains 0 it is the identity. Boxes pass through.
    """

    _transformed_types = (tv_tensors.Image, is_pure_tensor)

    def __init__(self, hgain: float = 0.015, sgain: float = 0.7, vgain: float = 0.4) -> None:
        super().__init__()
        self.hgain = hgain
        self.sgain = sgain
        self.vgain = vgain

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the three gains for this call."""
        gains = torch.tensor([self.hgain, self.sgain, self.vgain])
        return {"r": torch.empty(3).uniform_(-1.0, 1.0) * gains + 1.0}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Jitter one RGB image (CHW, or NCHW with the same gains for every image)."""
        r = params["r"]
        if bool((r == 1.0).all()):
            return inpt
        x = _unwrap(inpt)
        if x.ndim < 3 or x.shape[-3] != 3:
            raise ValueError(f"AugmentHSV needs an RGB image (3 channels), got shape {tuple(x.shape)}")
        work = x.to(x.dtype if x.is_floating_point() else torch.float32)
        hsv = rgb_to_hsv(work.clamp(0, 255) / 255.0)
        h, s, v = hsv.unbind(-3)
        r0, r1, r2 = (float(g) for g in r)
        hsv = torch.stack([torch.remainder(h * r0, 1.0), (s * r1).clamp(0, 1), (v * r2).clamp(0, 1)], dim=-3)
        out = hsv_to_rgb(hsv) * 255.0
        if not x.is_floating_point():
            out = out.round().clamp(0, 255).to(x.dtype)
        return _rewrap(out, inpt)
