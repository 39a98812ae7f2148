"""Named image transforms that recipes configure as a list of tables.

    train_transforms = [
      {name = "RandomResizedCrop", size = 64, scale = [0.6, 1.0]},
      {name = "RandomHorizontalFlip"},
      {name = "ToFloat"},
      {name = "Normalize", mean = 128, std = 128},
    ]

Names are looked up in `TRANSFORMS`, a plain-name registry of factories (no import paths, no
`eval`). Every transform is a `torchvision.transforms.v2` transform working on uint8 (or float
0..255) CHW tensors; the pipeline returned by `build_transforms` is called as ``t(image)`` or, for
detection, ``t(image, target)`` with ``target["boxes"]`` a `tv_tensors.BoundingBoxes`, which the
geometric transforms move along with the image.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2._utils import is_pure_tensor

from hatcli.errors import RecipeError
from hatcli.registry import Registry, closest

TransformFactory = Callable[..., v2.Transform]

TRANSFORMS: Registry[TransformFactory] = Registry("transform")
"""Transform factories by plain name; plugins may `register` more."""


class ArgumentError(ValueError):
    """A bad transform argument; `build_transforms` turns it into a RecipeError naming the key."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


def _number(arg: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(arg, f"must be a number, got {value!r}")
    if low is not None and value < low:
        bound = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        raise ArgumentError(arg, f"must be {bound}, got {value!r}")
    if high is not None and value > high:
        bound = f"in [{low}, {high}]" if low is not None else f"at most {high}"
        raise ArgumentError(arg, f"must be {bound}, got {value!r}")
    return float(value)


def _size(arg: str, value: Any) -> int | list[int]:
    """An int (shorter side / square) or [height, width], all positive."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if (
        isinstance(value, (list, tuple)) and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return [int(v) for v in value]
    raise ArgumentError(arg, f"must be a positive int or [height, width], got {value!r}")


def _pair(arg: str, value: Any, low: float | None = None, high: float | None = None) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ArgumentError(arg, f"must be a pair [low, high], got {value!r}")
    a, b = (_number(arg, v, low, high) for v in value)
    if a > b:
        raise ArgumentError(arg, f"low must not exceed high, got {value!r}")
    return a, b


def _per_channel(arg: str, value: Any, positive: bool = False) -> list[float]:
    values = value if isinstance(value, (list, tuple)) else [value]
    if len(values) not in (1, 3):
        raise ArgumentError(arg, f"must be a number or a list of 3 numbers, got {value!r}")
    out = [_number(arg, v) for v in values]
    if positive and any(v <= 0 for v in out):
        raise ArgumentError(arg, f"must be positive, got {value!r}")
    return out * 3 if len(out) == 1 else out


def _jitter(arg: str, value: Any, hue: bool = False) -> float | tuple[float, float] | None:
    if value is None:
        return None
    limit = 0.5 if hue else None
    if isinstance(value, (list, tuple)):
        return _pair(arg, value, -0.5 if hue else 0.0, limit)
    return _number(arg, value, 0.0, limit)


class ToFloat(v2.Transform):
    """uint8 image -> float32 with values kept on the 0..255 scale (no division by 255)."""

    _transformed_types = (tv_tensors.Image, is_pure_tensor)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Convert one image tensor."""
        return inpt.to(torch.float32)


class RGBToYUV444(v2.Transform):
    """RGB -> YUV 4:4:4, BT.601 full range (JPEG/JFIF), as the device's input pipeline expects.

    Works on 0..255 values (uint8 is converted first) and returns float32. By default the result
    is rounded and clamped to 0..255, since the device receives 8-bit YUV.
    """

    _transformed_types = (tv_tensors.Image, is_pure_tensor)
    _MATRIX = torch.tensor([
        [0.299, 0.587, 0.114],
        [-0.168736, -0.331264, 0.5],
        [0.5, -0.418688, -0.081312],
    ])
    _OFFSET = torch.tensor([0.0, 128.0, 128.0])

    def __init__(self, round_to_uint8: bool = True) -> None:
        super().__init__()
        self.round_to_uint8 = round_to_uint8

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Convert one CHW (or NCHW) RGB tensor."""
        x = inpt.as_subclass(torch.Tensor).to(torch.float32)
        if x.shape[-3] != 3:
            raise ValueError(f"RGBToYUV444 needs 3 channels, got shape {tuple(x.shape)}")
        matrix, offset = self._MATRIX.to(x.device), self._OFFSET.to(x.device)
        yuv = torch.einsum("ij,...jhw->...ihw", matrix, x) + offset[:, None, None]
        if self.round_to_uint8:
            yuv = yuv.round().clamp(0, 255)
        return tv_tensors.wrap(yuv, like=inpt) if isinstance(inpt, tv_tensors.Image) else yuv


def _resize(size: Any, antialias: bool = True) -> v2.Transform:
    """Resize: an int resizes the shorter side, [h, w] resizes to exactly that size."""
    return v2.Resize(_size("size", size), antialias=bool(antialias))


def _center_crop(size: Any) -> v2.Transform:
    """Crop the centre to `size` (int or [h, w])."""
    return v2.CenterCrop(_size("size", size))


def _random_resized_crop(
    size: Any, scale: Any = (0.08, 1.0), ratio: Any = (0.75, 1.333), antialias: bool = True
) -> v2.Transform:
    """Crop a random area fraction in `scale` with aspect ratio in `ratio`, resized to `size`."""
    return v2.RandomResizedCrop(
        _size("size", size), scale=_pair("scale", scale, 0.0, 1.0),
        ratio=_pair("ratio", ratio, 1e-3, None), antialias=bool(antialias),
    )


def _random_horizontal_flip(p: Any = 0.5) -> v2.Transform:
    """Flip left-right with probability `p`."""
    return v2.RandomHorizontalFlip(_number("p", p, 0.0, 1.0))


def _color_jitter(brightness: Any = None, contrast: Any = None, saturation: Any = None, hue: Any = None) -> v2.Transform:
    """Random brightness/contrast/saturation/hue changes (torchvision semantics)."""
    return v2.ColorJitter(
        brightness=_jitter("brightness", brightness), contrast=_jitter("contrast", contrast),
        saturation=_jitter("saturation", saturation), hue=_jitter("hue", hue, hue=True),
    )


def _to_float() -> v2.Transform:
    """uint8 -> float32 on the 0..255 scale."""
    return ToFloat()


def _normalize(mean: Any, std: Any) -> v2.Transform:
    """(x - mean) / std per channel, on whatever scale the input has (0..255 after ToFloat)."""
    return v2.Normalize(_per_channel("mean", mean), _per_channel("std", std, positive=True))


def _rgb_to_yuv444(round_to_uint8: Any = True) -> v2.Transform:
    """RGB -> YUV444, BT.601 full range, on 0..255 values."""
    if not isinstance(round_to_uint8, bool):
        raise ArgumentError("round_to_uint8", f"must be true or false, got {round_to_uint8!r}")
    return RGBToYUV444(round_to_uint8)


for _name, _factory in {
    "Resize": _resize,
    "CenterCrop": _center_crop,
    "RandomResizedCrop": _random_resized_crop,
    "RandomHorizontalFlip": _random_horizontal_flip,
    "ColorJitter": _color_jitter,
    "ToFloat": _to_float,
    "Normalize": _normalize,
    "RGBToYUV444": _rgb_to_yuv444,
}.items():
    TRANSFORMS.register(_name, _factory)


def _build_one(spec: Any, key: str) -> v2.Transform:
    """Build the transform described by one recipe table; `key` is e.g. `data.train_transforms[2]`."""
    if not isinstance(spec, dict):
        raise RecipeError(f"{key}: expected a table like {{name = \"Resize\", size = 64}}, got {spec!r}")
    if "name" not in spec:
        raise RecipeError(f"{key}: missing `name` (one of {', '.join(TRANSFORMS.names())})")
    name = spec["name"]
    if not isinstance(name, str) or name not in TRANSFORMS:
        hint = closest(name, TRANSFORMS.names()) if isinstance(name, str) else None
        did_you_mean = f"; did you mean `{hint}`?" if hint else ""
        raise RecipeError(
            f"{key}.name: unknown transform `{name}`{did_you_mean} "
            f"Available: {', '.join(TRANSFORMS.names())}"
        )
    factory = TRANSFORMS.get(name)
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    params = inspect.signature(factory).parameters
    for arg in kwargs:
        if arg not in params:
            valid = [p for p in params]
            hint = closest(arg, valid)
            did_you_mean = f"; did you mean `{hint}`?" if hint else ""
            listing = ", ".join(valid) if valid else "none"
            raise RecipeError(f"{key}.{arg}: `{name}` takes no argument `{arg}`{did_you_mean} (arguments: {listing})")
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise RecipeError(f"{key}: `{name}` needs {', '.join(f'`{m}`' for m in missing)}")
    try:
        return factory(**kwargs)
    except ArgumentError as exc:
        raise RecipeError(f"{key}.{exc.argument}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{key}: bad arguments for `{name}`: {exc}") from None


def build_transforms(specs: list[dict[str, Any]] | None, where: str) -> v2.Compose:
    """Build a pipeline from recipe tables; `where` (e.g. `data.train_transforms`) names errors.

    The result is called as ``pipeline(image)`` or ``pipeline(image, target)``.
    """
    if specs is None:
        specs = []
    if not isinstance(specs, list):
        raise RecipeError(f"{where}: expected a list of transform tables, got {type(specs).__name__}")
    return v2.Compose([_build_one(spec, f"{where}[{i}]") for i, spec in enumerate(specs)])
