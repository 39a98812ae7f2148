"""What a user without hat needs to feed an exported or compiled model and read its outputs.

Derived from the recipe's val pipeline (the per-image `val_transforms`, then the batch transforms,
`ToFloat` and `Normalize`: exactly what `hat eval` and `hat infer` apply) and the family's task.
`consumer_spec` returns the manifest keys `task`, `kind`, `classes`, `preprocess` and
`output_meaning` (the family's `describe_outputs`, checked against the exported outputs);
docs/formats.md documents each one with an example in plain onnxruntime + numpy + PIL.
"""

from __future__ import annotations

from typing import Any

from torchvision.transforms import v2

from hatcli.errors import PluginError
from hatcli.inputs import batch_transform, image_transform, input_color_space
from hatcli.recipe import LoadedRecipe

DECODE = ("decode the file to 8-bit RGB (PIL: Image.open(path).convert('RGB')), channels first "
          "(HWC -> CHW)")
INTERPOLATION = "bilinear"
"""What `Resize` interpolates with (torchvision on uint8 tensors, antialiased when downscaling:
the same filter as PIL's Image.BILINEAR, results rounded to uint8)."""
YUV_FORMULA = ("Y = 0.299 R + 0.587 G + 0.114 B; U = -0.168736 R - 0.331264 G + 0.5 B + 128; "
               "V = 0.5 R - 0.418688 G - 0.081312 B + 128 (BT.601 full range)")


def _resize_step(t: Any) -> dict[str, Any]:
    step: dict[str, Any] = {"op": "resize", "interpolation": INTERPOLATION, "antialias": bool(t.antialias),
                            "output": "uint8, rounded as PIL does"}
    if isinstance(t.size, int):
        step.update(mode="shorter_side", size=t.size,
                    note="the shorter side becomes `size`, the longer one keeps the aspect ratio")
    elif t.keep_ratio:
        h, w = t.size
        step.update(mode="keep_ratio", size=[h, w],
                    note=f"one factor f = min({max(h, w)} / max(H, W), {min(h, w)} / min(H, W)) for both "
                         "sides of the H x W image; new sides int(side * f + 0.5)")
    else:
        step.update(mode="stretch", size=list(t.size), note="exactly height x width, aspect ratio not kept")
    if t.ratio_range is not None:
        step["random_ratio_range"] = list(t.ratio_range)
    return step


def _pad_step(t: Any) -> dict[str, Any]:
    step: dict[str, Any] = {"op": "pad", "where": "bottom_right", "value": t.fill,
                            "note": "the image stays at the top-left corner; box coordinates are unchanged"}
    if t.size_divisor is not None:
        step["to_multiple_of"] = t.size_divisor
    else:
        step["size"] = list(t.size)
    return step


def _step(t: Any) -> list[dict[str, Any]]:
    """The plain description of one transform of the val pipeline (hat's own or torchvision's)."""
    from hatcli.data import transform_ops as ops

    if isinstance(t, v2.Identity):
        return []
    if isinstance(t, ops.Resize):
        return [_resize_step(t)]
    if isinstance(t, ops.Pad):
        return [_pad_step(t)]
    if isinstance(t, v2.CenterCrop):
        return [{"op": "center_crop", "size": list(t.size), "note": "the centre height x width window"}]
    if isinstance(t, ops.ToTensor):
        steps = [{"op": "to_float", "note": "uint8 -> float32, values stay on the 0..255 scale"}]
        return steps + ([_yuv_step(True)] if t.to_yuv else [])
    if isinstance(t, ops.ToFloat):
        return [{"op": "to_float", "note": "uint8 -> float32, values stay on the 0..255 scale"}]
    if isinstance(t, ops.RGBToYUV444):
        return [_yuv_step(t.round_to_uint8)]
    if isinstance(t, ops.Normalize):
        return [{"op": "normalize", "mean": list(t.mean), "std": list(t.std),
                 "note": "(x - mean[c]) / std[c] per channel c, on the 0..255 scale"}]
    return [{"op": type(t).__name__, "note": "a transform only hat implements (or a random one): "
                                             "outside hat, results will differ"}]


def _yuv_step(rounded: bool) -> dict[str, Any]:
    return {"op": "rgb_to_yuv444", "formula": YUV_FORMULA, "round_to_uint8": rounded,
            "note": "then rounded and clamped to 0..255" if rounded else "not rounded"}


def preprocess_spec(lr: LoadedRecipe) -> dict[str, Any]:
    """The val pipeline as plain steps plus a summary (resize, colour space, normalization, the
    tensor the model takes)."""
    per_image = list(image_transform(lr, "val").transforms)
    steps = [step for t in per_image + list(batch_transform(lr).transforms) for step in _step(t)]
    resize = next((s for s in steps if s["op"] == "resize"), None)
    pad = next((s for s in steps if s["op"] == "pad"), None)
    method = "none" if resize is None else resize["mode"] + ("_pad" if pad and resize["mode"] == "keep_ratio" else "")
    h, w = lr.recipe.data.input_size
    mean, std = list(lr.recipe.data.mean), list(lr.recipe.data.std)
    return {
        "decode": DECODE,
        "steps": steps,
        "resize": {"method": method, "size": [h, w], "interpolation": INTERPOLATION if resize else None,
                   "antialias": resize["antialias"] if resize else None,
                   "pad": {"value": pad["value"], "where": pad["where"]} if pad else None},
        "color_space": input_color_space(lr),
        "normalize": {"mean": mean, "std": std},
        "input": {"shape": ["N", 3, h, w], "dtype": "float32", "layout": "NCHW",
                  "range": [[(0 - m) / s, (255 - m) / s] for m, s in zip(mean, std)],
                  "note": "channels in `color_space` order, after every step above; any batch size N"},
    }


def _dims_agree(described: list[Any], exported: list[Any]) -> bool:
    """Whether a family's shape fits the exported one: a symbolic dim (`"N"`) on either side fits any."""
    return len(described) == len(exported) and all(
        isinstance(d, str) or isinstance(e, str) or d == e for d, e in zip(described, exported))


def output_meaning(lr: LoadedRecipe, output_spec: list[dict[str, Any]], classes: list[str]) -> list[dict[str, Any]]:
    """What each model output is, in output order: the family's `describe_outputs`, checked against
    the exported outputs (`output_spec`) and given their shape where the family states none.

    A description that names other outputs or other shapes than the exported model has would
    mislead every consumer: it is a PluginError naming the family and the output.
    """
    family = lr.family
    where = f"model family `{family.name}` ({type(family).__module__}.{type(family).__name__}).describe_outputs"
    described = family.describe_outputs(lr.model, tuple(lr.recipe.data.input_size), len(classes))
    names = [entry.get("name") if isinstance(entry, dict) else None for entry in described]
    exported = [spec["name"] for spec in output_spec]
    if names != exported:
        raise PluginError(f"{where}: describes the outputs {names}, but the exported model has {exported}; "
                          "the family must describe every output of its deploy model, in `output_names` order")
    meaning = []
    for entry, spec in zip(described, output_spec):
        shape = entry.get("shape", spec["shape"])
        if not _dims_agree(list(shape), list(spec["shape"])):
            raise PluginError(f"{where}: output `{spec['name']}` has shape {spec['shape']} in the exported model, "
                              f"but the family describes {shape}; fix the family's description")
        rest = {k: v for k, v in entry.items() if k not in ("name", "shape")}
        meaning.append({"name": entry["name"], "shape": list(shape), **rest})
    return meaning


def consumer_spec(lr: LoadedRecipe, output_spec: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """The manifest keys a consumer without hat reads: task, kind, classes, preprocess, output_meaning."""
    return {"task": lr.recipe.task, "kind": lr.family.task, "classes": list(classes),
            "preprocess": preprocess_spec(lr), "output_meaning": output_meaning(lr, output_spec, classes)}
