"""torchvision's own model registry and builders, checked before anything trains.

Every look-up goes through `torchvision.models`' public API: `list_models(module=torchvision.models)`
for the classification archs, `get_model_builder(arch)` for one arch's builder and `get_model(arch,
weights=None, ...)` to build it (never with weights: hat downloads nothing).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from typing import Any

from hatcli.tasks import library_models
from hatcli.tasks.library_models import PROBE_CLASSES, named_parameters, probe_baseline, size_text

RESERVED: dict[str, str] = {
    "num_classes": "the packed training data decides the class count; set `model.num_classes` to have "
                   "training check it",
    "image_size": "the input size is `data.input_size`; hat passes it to the archs that take one (ViT)",
    "input_size": "the input size is `data.input_size`; hat passes it to the archs that take one (MaxViT)",
    "aux_logits": "hat builds torchvision's auxiliary classifiers off (GoogLeNet, Inception v3): the "
                  "loss and the deployed model use the main logits",
    "weights": "hat builds the network untrained and never downloads weights; download them yourself and "
               "load the file with `model.weights` (plugins/torchvision_family/README.md)",
    "progress": "hat builds the network untrained and downloads nothing",
}
"""`options` keys the family refuses, and why: hat sets them, or the recipe has its own key for them."""

SIZE_KEYS = {"image_size", "input_size"}
"""The keywords hat sets for the recipe's input size."""


def models_module() -> Any:
    """`torchvision.models`, imported when first needed."""
    import torchvision.models

    return torchvision.models


@functools.lru_cache(maxsize=1)
def arch_names() -> tuple[str, ...]:
    """The classification archs of torchvision's registry (`list_models(module=torchvision.models)`)."""
    models = models_module()
    return tuple(models.list_models(module=models))


def check_arch(arch: str) -> str:
    """Return `arch` if torchvision registers it as a classification model, else raise a one-line
    ValueError naming the closest names (or the task it belongs to)."""
    names = arch_names()
    if arch in names:
        return arch
    models = models_module()
    if arch in models.list_models():  # a detection, segmentation, video, optical-flow or quantized model
        task = models.get_model_builder(arch).__module__.removeprefix("torchvision.models.").split(".")[0]
        raise ValueError(f"torchvision's `{arch}` is a {task} model; the `torchvision` family builds the "
                         f"classification models of `torchvision.models.list_models(module=torchvision.models)`")
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    hint = (f"closest: {', '.join(f'`{n}`' for n in close)}" if close
            else f"the classification archs are {', '.join(names)}")
    raise ValueError(f"torchvision has no classification arch `{arch}`; {hint}")


def builder(arch: str, num_classes: int = PROBE_CLASSES) -> Callable[..., Any]:
    """`torchvision.models.get_model` for `arch`: untrained (`weights=None`), `num_classes`
    outputs; call it with the keyword arguments."""
    return functools.partial(models_module().get_model, arch, weights=None, num_classes=num_classes)


@functools.lru_cache(maxsize=64)
def hat_kwargs(arch: str, input_size: tuple[int, int] | None) -> tuple[tuple[str, Any], ...]:
    """The keyword arguments hat itself gives `arch`'s builder, as (key, value) pairs, read off
    the model class's constructor: `aux_logits=False` where it has auxiliary classifiers, and the
    recipe's input size where the network is built for one size: `image_size` (ViT, square
    only) or `input_size` (MaxViT). Raises a ValueError for a ViT and a non-square input."""
    model_class = probe_baseline(builder(arch), {}).model_class
    params = set(named_parameters(model_class, set()))
    base: dict[str, Any] = {}
    if "aux_logits" in params:
        base["aux_logits"] = False
    if input_size is not None and "image_size" in params:
        if input_size[0] != input_size[1]:
            raise ValueError(f"torchvision arch `{arch}` takes square inputs only (`image_size`), and "
                             f"`data.input_size` is {size_text(input_size)}")
        base["image_size"] = input_size[0]
    if input_size is not None and "input_size" in params:
        base["input_size"] = tuple(input_size)
    return tuple(base.items())


def check_options(arch: str, options: dict[str, Any], input_size: tuple[int, int] | None) -> dict[str, Any]:
    """Return `options` if `get_model(arch, weights=None, **options)` takes every key and the
    network runs on `input_size` and gives one logit per class; else raise a one-line ValueError
    naming the key and the arch."""
    library_models.refuse_reserved(options, RESERVED)
    base = dict(hat_kwargs(arch, input_size))
    return library_models.check_options("torchvision", arch, options, input_size, build=builder(arch), base=base,
                                         reserved=RESERVED, size_keys=SIZE_KEYS)
