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
detection and segmentation, ``t(image, target)`` with ``target["boxes"]`` a
`tv_tensors.BoundingBoxes` and ``target["mask"]`` a `tv_tensors.Mask`, which the geometric
transforms move along with the image (masks resampled nearest-neighbour, padded with 255).

A few transforms (`BATCH_TRANSFORMS`: ToFloat, ToTensor, RGBToYUV444, Normalize) also work on
NCHW batches on any device; `build_batch_transforms` builds a pipeline of only those, to run on a
whole batch after it has been moved to the GPU.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from hatcli.data.lmdb_format import IGNORE_INDEX
from hatcli.data.transform_ops import (
    AugmentHSV,
    Normalize,
    Pad,
    RandomFlip,
    Resize,
    RGBToYUV444,
    ToFloat,
    ToTensor,
)
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


def _bool(arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ArgumentError(arg, f"must be true or false, got {value!r}")
    return value


def _positive_int(arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ArgumentError(arg, f"must be a positive int, got {value!r}")
    return value


def _fill(arg: str, value: Any) -> float | list[float]:
    """A pixel value for padded areas: one number, or one per channel (3), each in 0..255."""
    if isinstance(value, (list, tuple)):
        if len(value) != 3:
            raise ArgumentError(arg, f"must be a number or a list of 3 numbers, got {value!r}")
        return [_number(arg, v, 0.0, 255.0) for v in value]
    return _number(arg, value, 0.0, 255.0)


# -- factories: the recipe's keyword arguments -------------------------------------------------


def _resize(size: Any, keep_ratio: Any = False, ratio_range: Any = None, antialias: Any = True) -> v2.Transform:
    """Resize: an int resizes the shorter side, [h, w] resizes to exactly that size (or, with
    `keep_ratio`, to fit inside it); `ratio_range` scales the target by a random ratio per call."""
    size = _size("size", size)
    keep_ratio = _bool("keep_ratio", keep_ratio)
    if keep_ratio and isinstance(size, int):
        raise ArgumentError(
            "keep_ratio", "needs size = [height, width]: an int size already keeps the aspect ratio "
            "(it sets the shorter side)"
        )
    ratio = None
    if ratio_range is not None:
        ratio = _pair("ratio_range", ratio_range, 0.0)
        if ratio[0] <= 0:
            raise ArgumentError("ratio_range", f"must be positive, got {ratio_range!r}")
    return Resize(size, keep_ratio=keep_ratio, ratio_range=ratio, antialias=bool(antialias))


def _random_crop(size: Any, pad_if_needed: Any = True, fill: Any = 0) -> v2.Transform:
    """Crop a random `size` window (int = square, or [h, w]); boxes are shifted and clipped.

    With `pad_if_needed` a smaller image is padded with `fill` first (it lands at a random offset);
    a segmentation mask is padded with the ignore index (255).
    """
    return v2.RandomCrop(
        _size("size", size), pad_if_needed=_bool("pad_if_needed", pad_if_needed),
        fill={tv_tensors.Mask: IGNORE_INDEX, "others": _fill("fill", fill)},
    )


def _center_crop(size: Any) -> v2.Transform:
    """Crop the centre to `size` (int or [h, w])."""
    return v2.CenterCrop(_size("size", size))


def _pad(size_divisor: Any = None, size: Any = None, fill: Any = 0) -> v2.Transform:
    """Pad bottom/right to a multiple of `size_divisor`, or to exactly `size` (int or [h, w])."""
    if size_divisor is None and size is None:
        raise ArgumentError("size_divisor", "give `size_divisor` or `size` (exactly one of them)")
    if size_divisor is not None and size is not None:
        raise ArgumentError("size", "give either `size_divisor` or `size`, not both")
    divisor = _positive_int("size_divisor", size_divisor) if size_divisor is not None else None
    target = None
    if size is not None:
        checked = _size("size", size)
        target = (checked, checked) if isinstance(checked, int) else (checked[0], checked[1])
    return Pad(size_divisor=divisor, size=target, fill=_fill("fill", fill))


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


def _random_flip(px: Any = 0.5, py: Any = 0.0) -> v2.Transform:
    """Flip left-right with probability `px` and upside-down with probability `py`."""
    return RandomFlip(_number("px", px, 0.0, 1.0), _number("py", py, 0.0, 1.0))


def _color_jitter(brightness: Any = None, contrast: Any = None, saturation: Any = None, hue: Any = None) -> v2.Transform:
    """Random brightness/contrast/saturation/hue changes (torchvision semantics)."""
    return v2.ColorJitter(
        brightness=_jitter("brightness", brightness), contrast=_jitter("contrast", contrast),
        saturation=_jitter("saturation", saturation), hue=_jitter("hue", hue, hue=True),
    )


def _augment_hsv(hgain: Any = 0.015, sgain: Any = 0.7, vgain: Any = 0.4) -> v2.Transform:
    """YOLO-style random HSV gains (hue, saturation, value)."""
    return AugmentHSV(_number("hgain", hgain, 0.0), _number("sgain", sgain, 0.0), _number("vgain", vgain, 0.0))


def _to_float() -> v2.Transform:
    """uint8 -> float32 on the 0..255 scale."""
    return ToFloat()


def _to_tensor(to_yuv: Any = False) -> v2.Transform:
    """uint8 -> float32 on the 0..255 scale, optionally RGB -> YUV444 (as RGBToYUV444)."""
    return ToTensor(_bool("to_yuv", to_yuv))


def _normalize(mean: Any, std: Any) -> v2.Transform:
    """(x - mean) / std per channel, on whatever scale the input has (0..255 after ToFloat)."""
    return Normalize(_per_channel("mean", mean), _per_channel("std", std, positive=True))


def _rgb_to_yuv444(round_to_uint8: Any = True) -> v2.Transform:
    """RGB -> YUV444, BT.601 full range, on 0..255 values."""
    return RGBToYUV444(_bool("round_to_uint8", round_to_uint8))


for _name, _factory in {
    "Resize": _resize,
    "RandomCrop": _random_crop,
    "CenterCrop": _center_crop,
    "Pad": _pad,
    "RandomResizedCrop": _random_resized_crop,
    "RandomHorizontalFlip": _random_horizontal_flip,
    "RandomFlip": _random_flip,
    "ColorJitter": _color_jitter,
    "AugmentHSV": _augment_hsv,
    "ToFloat": _to_float,
    "ToTensor": _to_tensor,
    "Normalize": _normalize,
    "RGBToYUV444": _rgb_to_yuv444,
}.items():
    TRANSFORMS.register(_name, _factory)

BATCH_TRANSFORMS: set[str] = {"ToFloat", "ToTensor", "RGBToYUV444", "Normalize"}
"""Names of transforms that work on NCHW batches on any device (`build_batch_transforms` takes
only these); a plugin whose transform does too may add its name."""


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
    transforms = [_build_one(spec, f"{where}[{i}]") for i, spec in enumerate(specs)]
    return v2.Compose(transforms or [v2.Identity()])  # Compose refuses an empty list


class BatchPipeline:
    """Batch-capable transforms applied in order to one tensor: an NCHW batch (or a CHW image).

    Built by `build_batch_transforms`; the output equals applying the same pipeline image by image,
    and everything runs on the tensor's own device.
    """

    def __init__(self, transforms: list[v2.Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Run every transform on `batch` and return the result."""
        for transform in self.transforms:
            batch = transform(batch)
        return batch

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"BatchPipeline([{inner}])"


def build_batch_transforms(specs: list[dict[str, Any]] | None, where: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Build a pipeline for whole NCHW batches (e.g. on the GPU) from recipe tables.

    Only names in `BATCH_TRANSFORMS` are allowed; any other is a RecipeError naming
    ``{where}[i].name`` and listing the allowed names. The result is called as ``pipeline(batch)``.
    """
    if specs is None:
        specs = []
    if not isinstance(specs, list):
        raise RecipeError(f"{where}: expected a list of transform tables, got {type(specs).__name__}")
    allowed = sorted(BATCH_TRANSFORMS)
    transforms = []
    for i, spec in enumerate(specs):
        key = f"{where}[{i}]"
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(spec, dict) and "name" in spec and name not in BATCH_TRANSFORMS:
            hint = closest(name, allowed) if isinstance(name, str) else None
            did_you_mean = f"; did you mean `{hint}`?" if hint else ""
            why = "does not work on batches" if isinstance(name, str) and name in TRANSFORMS else "is unknown"
            raise RecipeError(
                f"{key}.name: transform `{name}` {why}{did_you_mean} "
                f"(batch transforms: {', '.join(allowed)})"
            )
        transforms.append(_build_one(spec, key))
    return BatchPipeline(transforms)
