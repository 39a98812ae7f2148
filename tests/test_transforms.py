"""The recipe transforms (hatcli/data/transforms.py), detection ones first.

Every transform is built the way a recipe builds it, from a table such as
``{name = "Resize", size = [50, 50], keep_ratio = true}``, and called as ``t(image, target)``
with ``target["boxes"]`` a `tv_tensors.BoundingBoxes` in XYXY pixels, as `DetectionDataset`
does. Images are small synthetic uint8 CHW tensors.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from hatcli.data.transforms import (
    BATCH_TRANSFORMS,
    TRANSFORMS,
    build_batch_transforms,
    build_transforms,
)
from hatcli.data.transform_ops import hsv_to_rgb, rgb_to_hsv
from hatcli.errors import RecipeError

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
    ),
]


def one(spec: dict[str, Any]) -> v2.Compose:
    """The pipeline of a recipe with the single transform `spec`."""
    return build_transforms([spec], "data.train_transforms")


def sample(height: int, width: int, boxes: list[list[float]], labels: list[int] | None = None) -> tuple:
    """A black uint8 image and a detection target holding `boxes` (XYXY pixels)."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                          format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor(labels if labels is not None else [1] * len(boxes)),
    }
    return image, target


def random_image(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 pixels, the same for the same seed."""
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_the_hat_detection_transforms_are_registered() -> None:
    for name in ("Resize", "RandomCrop", "Pad", "RandomFlip", "AugmentHSV", "ToTensor"):
        assert name in TRANSFORMS
    assert BATCH_TRANSFORMS == {"ToFloat", "ToTensor", "RGBToYUV444", "Normalize"}


# -- Resize ------------------------------------------------------------------------------------


def test_resize_int_sets_the_shorter_side_as_before() -> None:
    image, target = sample(20, 40, [[4, 2, 20, 10]])
    out, target = one({"name": "Resize", "size": 10})(image, target)
    assert out.shape == (3, 10, 20)
    assert torch.equal(out, v2.Resize(10)(image))  # same as torchvision's Resize
    assert target["boxes"].tolist() == [[2, 1, 10, 5]] and target["boxes"].canvas_size == (10, 20)


def test_resize_to_h_w_scales_x_and_y_separately() -> None:
    image, target = sample(20, 40, [[4, 2, 20, 10]])
    out, target = one({"name": "Resize", "size": [40, 20]})(image, target)
    assert out.shape == (3, 40, 20)
    assert target["boxes"].tolist() == [[2, 4, 10, 20]]


def test_resize_keep_ratio_fits_the_image_inside_the_size() -> None:
    image, target = sample(100, 200, [[20, 10, 60, 50]])
    out, target = one({"name": "Resize", "size": [50, 50], "keep_ratio": True})(image, target)
    assert out.shape == (3, 25, 50)  # one factor for both sides: min(50/200, 50/100) = 0.25
    assert target["boxes"].tolist() == [[5, 2.5, 15, 12.5]]  # boxes scale by the same 0.25
    assert target["boxes"].canvas_size == (25, 50)


def test_resize_keep_ratio_is_mmdet_rescale_long_side_to_long_side() -> None:
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    # factor = min(max(h, w) / 200, min(h, w) / 100): the orientation of `size` does not matter
    for size in ([80, 120], [120, 80]):
        assert one({"name": "Resize", "size": size, "keep_ratio": True})(image).shape == (3, 60, 120)
    # output sides are rounded with int(x * factor + 0.5): 3 * (10 / 4) = 7.5 -> 8
    assert one({"name": "Resize", "size": [10, 10], "keep_ratio": True})(torch.zeros(3, 3, 4)).shape == (3, 8, 10)


def test_resize_ratio_range_draws_a_new_size_per_call_reproducibly() -> None:
    resize = one({"name": "Resize", "size": [40, 40], "ratio_range": [0.5, 1.5]})
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    torch.manual_seed(0)
    first = [tuple(resize(image).shape[1:]) for _ in range(8)]
    torch.manual_seed(0)
    again = [tuple(resize(image).shape[1:]) for _ in range(8)]
    assert first == again  # seeding torch reproduces the draws
    assert len(set(first)) > 1  # the ratio is drawn on every call
    assert all(h == w and 20 <= h <= 60 for h, w in first)


def test_resize_ratio_range_with_keep_ratio_scales_boxes_with_the_image() -> None:
    resize = one({"name": "Resize", "size": [40, 40], "keep_ratio": True, "ratio_range": [0.5, 1.0]})
    torch.manual_seed(3)
    for _ in range(5):
        image, target = sample(40, 80, [[8, 4, 40, 20]])
        out, target = resize(image, target)
        height, width = out.shape[-2:]
        assert 20 <= width <= 40 and abs(width - 2 * height) <= 1  # aspect ratio kept, up to rounding
        scale = torch.tensor([width / 80, height / 40, width / 80, height / 40])
        assert torch.allclose(target["boxes"], torch.tensor([[8, 4, 40, 20]]) * scale)


def test_resize_an_int_ratio_range_scales_the_shorter_side() -> None:
    resize = one({"name": "Resize", "size": 20, "ratio_range": [2.0, 2.0]})
    assert resize(torch.zeros(3, 10, 30, dtype=torch.uint8)).shape == (3, 40, 120)


# -- RandomCrop --------------------------------------------------------------------------------


def test_random_crop_moves_boxes_with_the_pixels() -> None:
    crop = one({"name": "RandomCrop", "size": [20, 24]})
    box = [10, 12, 30, 22]
    torch.manual_seed(0)
    for _ in range(20):
        image, target = sample(40, 40, [box])
        image[0, 12:22, 10:30] = 255  # paint the box red
        out, target = crop(image, target)
        assert out.shape == (3, 20, 24)
        assert len(target["boxes"]) == 1 and len(target["labels"]) == 1  # empty boxes are not dropped here
        x1, y1, x2, y2 = (int(v) for v in target["boxes"][0].tolist())  # shifted and clipped
        red = out[0] == 255
        assert red.sum() == max(x2 - x1, 0) * max(y2 - y1, 0)  # the box covers exactly the red pixels
        if red.any():
            assert red[y1:y2, x1:x2].all()


def test_random_crop_pads_a_small_image_with_fill() -> None:
    image, target = sample(10, 10, [[0, 0, 10, 10]])
    image[:] = 7
    out, target = one({"name": "RandomCrop", "size": 16, "fill": 100})(image, target)
    assert out.shape == (3, 16, 16)
    assert (out == 100).sum() == 3 * (16 * 16 - 10 * 10)
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0].tolist())
    assert (out[:, y1:y2, x1:x2] == 7).all() and (x2 - x1, y2 - y1) == (10, 10)


def test_random_crop_without_padding_refuses_a_small_image() -> None:
    crop = one({"name": "RandomCrop", "size": 16, "pad_if_needed": False})
    with pytest.raises(ValueError, match="larger than"):
        crop(torch.zeros(3, 10, 10, dtype=torch.uint8))


# -- Pad ---------------------------------------------------------------------------------------


def test_pad_to_a_size_divisor_pads_bottom_right_and_keeps_boxes() -> None:
    image, target = sample(33, 40, [[1, 2, 30, 31]])
    image[:] = 9
    out, target = one({"name": "Pad", "size_divisor": 32, "fill": 114})(image, target)
    assert out.shape == (3, 64, 64)
    assert (out[:, :33, :40] == 9).all()  # the image stays at the top left
    assert (out[:, 33:, :] == 114).all() and (out[:, :, 40:] == 114).all()
    assert target["boxes"].tolist() == [[1, 2, 30, 31]] and target["boxes"].canvas_size == (64, 64)


def test_pad_to_an_exact_size() -> None:
    image, target = sample(33, 40, [[1, 2, 30, 31]])
    out, target = one({"name": "Pad", "size": [48, 50]})(image, target)
    assert out.shape == (3, 48, 50) and target["boxes"].tolist() == [[1, 2, 30, 31]]
    assert one({"name": "Pad", "size_divisor": 8})(torch.zeros(3, 16, 24)).shape == (3, 16, 24)  # already fits


def test_pad_refuses_an_image_larger_than_size() -> None:
    with pytest.raises(ValueError, match=r"33x40 is larger than size = \[32, 64\]"):
        one({"name": "Pad", "size": [32, 64]})(torch.zeros(3, 33, 40, dtype=torch.uint8))


# -- RandomFlip --------------------------------------------------------------------------------


def test_random_flip_px_1_mirrors_boxes_left_right() -> None:
    image, target = sample(20, 30, [[2, 3, 10, 8]])
    image[0, 3:8, 2:10] = 255
    out, target = one({"name": "RandomFlip", "px": 1.0})(image, target)  # py defaults to 0
    assert target["boxes"].tolist() == [[30 - 10, 3, 30 - 2, 8]]  # x1' = W - x2, x2' = W - x1
    assert torch.equal(out, image.flip(-1))


def test_random_flip_py_1_mirrors_boxes_upside_down() -> None:
    image, target = sample(20, 30, [[2, 3, 10, 8]])
    out, target = one({"name": "RandomFlip", "px": 0.0, "py": 1.0})(image, target)
    assert target["boxes"].tolist() == [[2, 20 - 8, 10, 20 - 3]]
    assert torch.equal(out, image.flip(-2))


def test_random_flip_is_random_and_reproducible() -> None:
    flip = one({"name": "RandomFlip"})
    image = random_image(3, 4, 4)

    def flips() -> list[bool]:
        return [not torch.equal(flip(image), image) for _ in range(30)]

    torch.manual_seed(1)
    first = flips()
    torch.manual_seed(1)
    assert flips() == first and 0 < sum(first) < 30


# -- AugmentHSV --------------------------------------------------------------------------------


def test_rgb_to_hsv_to_rgb_round_trips_uint8_exactly() -> None:
    image = random_image(2, 3, 64, 64)
    corners = torch.tensor([[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0],
                            [0, 0, 255], [255, 255, 0], [1, 0, 0], [255, 254, 255]], dtype=torch.uint8)
    image[0, :, 0, : len(corners)] = corners.T
    back = (hsv_to_rgb(rgb_to_hsv(image.float() / 255)) * 255).round().to(torch.uint8)
    assert torch.equal(back, image)


def test_rgb_to_hsv_known_colours() -> None:
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5]]).T.reshape(3, 1, 4)
    hsv = rgb_to_hsv(rgb)[:, 0].T
    expected = torch.tensor([[0, 1, 1], [1 / 3, 1, 1], [2 / 3, 1, 1], [0, 0, 0.5]])
    assert torch.allclose(hsv, expected)


def test_augment_hsv_with_zero_gains_is_the_identity() -> None:
    hsv = one({"name": "AugmentHSV", "hgain": 0, "sgain": 0, "vgain": 0})
    image = random_image(3, 16, 16)
    assert torch.equal(hsv(image), image)
    assert torch.equal(hsv(image.float()), image.float())


def test_augment_hsv_changes_colours_keeps_dtype_and_boxes() -> None:
    hsv = one({"name": "AugmentHSV", "hgain": 0.5, "sgain": 0.7, "vgain": 0.4})
    image, target = sample(16, 16, [[1, 2, 3, 4]])
    image[:] = random_image(3, 16, 16)
    torch.manual_seed(0)
    out, out_target = hsv(image, target)
    assert out.dtype == torch.uint8 and out.shape == image.shape and not torch.equal(out, image)
    assert out_target["boxes"].tolist() == [[1, 2, 3, 4]]
    torch.manual_seed(0)
    out_float = hsv(image.float())
    assert out_float.dtype == torch.float32 and 0 <= out_float.min() and out_float.max() <= 255
    assert torch.allclose(out_float.round(), out.float(), atol=1)  # same draw, same colours


def test_augment_hsv_value_gain_scales_all_channels_alike() -> None:
    image = random_image(3, 8, 8).float() / 2  # <= 127.5, so a gain up to 1.4 does not clip
    torch.manual_seed(0)
    out = one({"name": "AugmentHSV", "hgain": 0, "sgain": 0, "vgain": 0.4})(image)
    gain = out.sum() / image.sum()
    assert 0.6 <= gain <= 1.4 and gain != 1
    assert torch.allclose(out, image * gain, atol=1e-3)


def test_augment_hsv_hue_gain_keeps_the_brightest_channel() -> None:
    image = random_image(3, 8, 8)
    torch.manual_seed(0)
    out = one({"name": "AugmentHSV", "hgain": 0.5, "sgain": 0, "vgain": 0})(image)
    assert not torch.equal(out, image)
    assert (out.amax(0).int() - image.amax(0).int()).abs().max() <= 1  # value (max of R, G, B) kept


# -- ToTensor ----------------------------------------------------------------------------------


def test_to_tensor_gives_float_on_the_0_255_scale() -> None:
    image, target = sample(4, 4, [[0, 0, 2, 2]])
    image[:] = random_image(3, 4, 4)
    out, target = one({"name": "ToTensor"})(image, target)
    assert out.dtype == torch.float32 and torch.equal(out, image.float())
    assert target["boxes"].tolist() == [[0, 0, 2, 2]]


def test_to_tensor_to_yuv_equals_rgb_to_yuv444() -> None:
    image = random_image(3, 8, 8)
    yuv = one({"name": "ToTensor", "to_yuv": True})(image)
    assert yuv.dtype == torch.float32
    assert torch.equal(yuv, one({"name": "RGBToYUV444"})(image))
    assert torch.equal(yuv, yuv.round()) and yuv.min() >= 0 and yuv.max() <= 255


# -- batches -----------------------------------------------------------------------------------


BATCH_SPECS = [
    {"name": "ToFloat"},
    {"name": "ToTensor"},
    {"name": "ToTensor", "to_yuv": True},
    {"name": "RGBToYUV444"},
    {"name": "RGBToYUV444", "round_to_uint8": False},
    {"name": "Normalize", "mean": [120, 128, 136], "std": [50, 60, 70]},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("spec", BATCH_SPECS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_batch_transforms_on_nchw_equal_per_image(spec: dict, dtype: torch.dtype, device: str) -> None:
    batch = random_image(4, 3, 8, 8).to(dtype).to(device)
    transform = one(spec)
    out = transform(batch)
    per_image = torch.stack([transform(image) for image in batch])
    assert out.device == batch.device and out.shape == batch.shape
    assert torch.allclose(out, per_image, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_build_batch_transforms_matches_the_per_image_pipeline(device: str) -> None:
    specs = [{"name": "ToTensor", "to_yuv": True}, {"name": "Normalize", "mean": 128, "std": 128}]
    batch = random_image(5, 3, 6, 7).to(device)
    out = build_batch_transforms(specs, "data.batch_transforms")(batch)
    per_image = build_transforms(specs, "t")
    assert out.device == batch.device and out.dtype == torch.float32
    assert torch.allclose(out, torch.stack([per_image(image) for image in batch]), atol=1e-6)
    assert -1 <= out.min() and out.max() < 1


def test_build_batch_transforms_rejects_per_image_transforms() -> None:
    with pytest.raises(RecipeError) as err:
        build_batch_transforms([{"name": "ToFloat"}, {"name": "RandomCrop", "size": 8}], "data.batch_transforms")
    message = str(err.value)
    assert message.startswith("data.batch_transforms[1].name: transform `RandomCrop` does not work on batches")
    assert "Normalize, RGBToYUV444, ToFloat, ToTensor" in message


def test_build_batch_transforms_names_unknown_names_and_bad_arguments() -> None:
    with pytest.raises(RecipeError, match=r"\[0\]\.name: transform `ToFlaot` is unknown; did you mean `ToFloat`"):
        build_batch_transforms([{"name": "ToFlaot"}], "data.batch_transforms")
    with pytest.raises(RecipeError, match=r"data\.batch_transforms\[0\]\.std: must be positive"):
        build_batch_transforms([{"name": "Normalize", "mean": 0, "std": 0}], "data.batch_transforms")
    assert torch.equal(build_batch_transforms([], "b")(torch.ones(1, 3, 2, 2)), torch.ones(1, 3, 2, 2))


# -- a whole detection pipeline and argument errors --------------------------------------------


def test_a_hat_style_detection_pipeline_keeps_boxes_on_the_canvas() -> None:
    pipeline = build_transforms(
        [
            {"name": "Resize", "size": [64, 64], "keep_ratio": True, "ratio_range": [0.5, 1.5]},
            {"name": "RandomFlip", "px": 0.5},
            {"name": "AugmentHSV"},
            {"name": "RandomCrop", "size": [48, 48]},
            {"name": "Pad", "size_divisor": 32},
            {"name": "ToTensor", "to_yuv": True},
        ],
        "data.train_transforms",
    )
    torch.manual_seed(0)
    for _ in range(5):
        image, target = sample(40, 60, [[5, 5, 30, 25], [40, 10, 55, 35]], [0, 2])
        image[:] = random_image(3, 40, 60)
        out, target = pipeline(tv_tensors.Image(image), target)
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32
        boxes = target["boxes"]
        assert boxes.canvas_size == (64, 64) and target["labels"].tolist() == [0, 2]
        assert (boxes >= 0).all() and (boxes <= 48).all()  # clipped to the crop, then padded


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"name": "Pad"}, r"\[0\]\.size_divisor: give `size_divisor` or `size`"),
        ({"name": "Pad", "size_divisor": 32, "size": [64, 64]}, r"\[0\]\.size: give either"),
        ({"name": "Pad", "size_divisor": 0}, r"\[0\]\.size_divisor: must be a positive int"),
        ({"name": "Pad", "size": 32, "fill": 300}, r"\[0\]\.fill: must be in \[0.0, 255.0\]"),
        ({"name": "Resize", "size": 32, "keep_ratio": True}, r"\[0\]\.keep_ratio: needs size = \[height, width\]"),
        ({"name": "Resize", "size": [32, 32], "ratio_range": [0, 1]}, r"\[0\]\.ratio_range: must be positive"),
        ({"name": "Resize", "size": [32, 32], "ratio_range": [2, 1]}, r"\[0\]\.ratio_range: low must not exceed"),
        ({"name": "Resize", "size": [32, 32], "keep_ratio": 1}, r"\[0\]\.keep_ratio: must be true or false"),
        ({"name": "RandomCrop"}, r"\[0\]: `RandomCrop` needs `size`"),
        ({"name": "RandomCrop", "size": [0, 8]}, r"\[0\]\.size: must be a positive int or \[height, width\]"),
        ({"name": "RandomFlip", "px": 1.5}, r"\[0\]\.px: must be in \[0.0, 1.0\]"),
        ({"name": "AugmentHSV", "vgain": -0.1}, r"\[0\]\.vgain: must be at least 0.0"),
        ({"name": "ToTensor", "to_yuv": "yes"}, r"\[0\]\.to_yuv: must be true or false"),
    ],
)
def test_bad_arguments_name_the_recipe_key(spec: dict, expected: str) -> None:
    with pytest.raises(RecipeError, match=r"^data\.train_transforms" + expected):
        build_transforms([spec], "data.train_transforms")
