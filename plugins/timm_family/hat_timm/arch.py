"""timm's own registry and constructor, checked before anything trains.

Every look-up goes through timm's public API: `timm.is_model` / `timm.list_models` for the arch,
`timm.models.get_pretrained_cfg` for whether it takes a fixed input size, `timm.create_model` (with
`pretrained=False`, always) to build it. timm is imported here, lazily, so that the family
registers and hat runs without it; a recipe that names the family then says how to install it.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from typing import Any

from hatcli.tasks import library_models
from hatcli.tasks.library_models import PROBE_CLASSES, one_line, probe_baseline, size_text

SIZE_KEYS = {"img_size"}
"""The keyword hat sets for the recipe's input size."""
INSTALL = "pip install timm (in a hat checkout: pip install -e 'plugins/timm_family[timm]')"

RESERVED: dict[str, str] = {
    "num_classes": "the packed training data decides the class count; set `model.num_classes` to have "
                   "training check it",
    "img_size": "the input size is `data.input_size`; hat passes it as `img_size` to archs of a fixed input size",
    "in_chans": "hat feeds the network 3-channel images",
    "features_only": "the family trains and deploys the classifier's logits",
    "scriptable": "hat sets timm's layer config itself (exportable)",
    "exportable": "hat sets timm's layer config itself (exportable)",
    "no_jit": "hat sets timm's layer config itself (exportable)",
    "device": "hat places the model on its device itself",
    "dtype": "hat trains in float32 and quantizes to integers itself",
    **{key: "hat builds the network untrained and never downloads weights; download them yourself and load "
            "the file with `model.weights` (plugins/timm_family/README.md)"
       for key in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")},
}
"""`options` keys the family refuses, and why: hat sets them, or the recipe has its own key for them."""


def require_timm() -> Any:
    """Import and return timm, or raise a ValueError that says how to install it."""
    try:
        import timm
        import timm.models
    except ImportError:
        raise ValueError(f"the `timm` family needs timm, which is not installed: {INSTALL}") from None
    return timm


@functools.lru_cache(maxsize=1)
def arch_names() -> tuple[str, ...]:
    """Every architecture name in timm's registry (`timm.list_models()`)."""
    return tuple(require_timm().list_models())


def check_arch(arch: str) -> str:
    """Return `arch` if timm's registry has it (a `name.tag` form included), else raise a one-line
    ValueError naming the closest registered names."""
    timm = require_timm()
    if timm.is_model(arch):
        return arch
    names = arch_names()
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    hint = (f"closest: {', '.join(f'`{n}`' for n in close)}" if close
            else "no registered name is close; `timm.list_models('*part*')` searches them")
    raise ValueError(f"timm has no arch `{arch}`; {hint} ({len(names)} archs in timm {timm.__version__})")


def builder(arch: str, num_classes: int = PROBE_CLASSES) -> Callable[..., Any]:
    """`timm.create_model` for `arch`: untrained (`pretrained=False`), `num_classes` outputs,
    export-friendly layers (`exportable=True`); call it with the keyword arguments."""
    timm = require_timm()
    return functools.partial(timm.create_model, arch, pretrained=False, num_classes=num_classes, exportable=True)


@functools.lru_cache(maxsize=64)
def hat_kwargs(arch: str, input_size: tuple[int, int] | None) -> tuple[tuple[str, Any], ...]:
    """The keyword arguments that give `arch` the recipe's input size, as (key, value) pairs.

    Only archs that timm's pretrained config marks `fixed_input_size` (ViT, Swin, LeViT, ...)
    need one: `img_size`, the recipe's `data.input_size` (an int when square). Raises a
    ValueError when such an arch takes no `img_size` and the input is not its own size.
    """
    if input_size is None:
        return ()
    cfg = require_timm().models.get_pretrained_cfg(arch)
    if cfg is None or not cfg.fixed_input_size or cfg.input_size is None:
        return ()
    default = tuple(cfg.input_size[-2:])
    if tuple(input_size) == default:
        return ()
    value = input_size[0] if input_size[0] == input_size[1] else tuple(input_size)
    baseline = probe_baseline(builder(arch), {"img_size": value})
    if baseline.error is None and "img_size" in baseline.received:
        return (("img_size", value),)
    if baseline.error is not None and baseline.refused_key != "img_size":
        raise ValueError(f"timm cannot build `{arch}` for an input of {size_text(input_size)} "
                         f"(`data.input_size`): {one_line(baseline.error)}")
    raise ValueError(f"timm arch `{arch}` takes a fixed input size of {size_text(default)} and has no "
                     f"`img_size` to change it: set `data.input_size = [{default[0]}, {default[1]}]` or choose another arch")


def check_options(arch: str, options: dict[str, Any], input_size: tuple[int, int] | None) -> dict[str, Any]:
    """Return `options` if `timm.create_model(arch, **options)` takes every key and the network
    runs on `input_size` and gives one logit per class; else raise a one-line ValueError naming
    the key (`model.options.KEY`) and the arch."""
    library_models.refuse_reserved(options, RESERVED)
    base = dict(hat_kwargs(arch, input_size))
    return library_models.check_options("timm", arch, options, input_size, build=builder(arch), base=base,
                                         reserved=RESERVED, size_keys=SIZE_KEYS,
                                         shape_hint="; check `global_pool` and the like")
