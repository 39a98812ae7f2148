"""hatcli.tasks.library_models, the shared part of the families that wrap a library's own model
registry (timm, torchvision): the build probe that tells taken, swallowed and otherwise used
options apart, the option check and its messages, and the `[model]` table base that keeps the
recipe's input size. Checked here on a small stand-in library, so no library is needed.

The helpers the library families' own tests share live in hatcli.testing.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from hatcli.tasks.library_models import (
    LibraryArchConfig,
    LibraryFamily,
    check_options,
    probe_baseline,
    probe_build,
    refuse_reserved,
    unused_options,
)

# -- a stand-in library ------------------------------------------------------------------------------


class _Swallowing(nn.Module):
    """A model class that ignores what it does not know, as some builders do."""

    def __init__(self, width: int = 4, dropout: float = 0.0, **ignored) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.drop = nn.Dropout(dropout)


def _build(depth_hint: int = 1, **kwargs) -> nn.Module:
    layers = kwargs.pop("layers", 1)  # read off **kwargs, never a parameter of its own
    model = _Swallowing(**kwargs)
    model.extra = nn.Sequential(*[nn.Identity() for _ in range(layers)])
    return model


class _Classifier(nn.Module):
    """A strict model class: conv, (optional) global pooling, a linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 4, pool: bool = True, img_size: int = 32) -> None:
        super().__init__()
        if img_size > 64:
            raise ValueError(f"img_size {img_size} is too large")
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1) if pool else nn.Identity()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


def _check(options: dict[str, Any], input_size: tuple[int, int] | None = (32, 32), *,
           build: Any = _Classifier, base: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    return check_options("lib", "tiny", options, input_size, build=build, base=base or {}, reserved={"num_classes"},
                         **kwargs)


# -- the probe ------------------------------------------------------------------------------------------

def test_the_probe_tells_taken_swallowed_and_otherwise_used_options_apart() -> None:
    options = {"dropout": 0.5, "layers": 3, "typo": 1}
    probe = probe_build(_build, options)
    assert probe.error is None and probe.received == {"dropout"}
    assert unused_options(_build, {}, options, probe, probe_baseline(_build, {})) == ["typo"]


def test_the_probe_reports_the_refused_key() -> None:
    def strict(width: int = 4) -> nn.Module:
        return nn.Conv2d(3, width, 3)

    assert probe_build(strict, {"widht": 2}).refused_key == "widht"


def test_the_probe_runs_the_model_on_the_input_size_on_the_meta_device() -> None:
    probe = probe_build(_Classifier, {"num_classes": 5}, (32, 48))
    assert probe.error is None and probe.output_shape == (1, 5) and probe.model_class is _Classifier


# -- the option check and its messages ------------------------------------------------------------------

def test_options_the_builder_takes_are_returned() -> None:
    assert _check({"width": 8}) == {"width": 8}


def test_a_key_hat_sets_itself_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"^`num_classes` cannot be set here: the data decides$"):
        refuse_reserved({"width": 8, "num_classes": 3}, {"num_classes": "the data decides"})


def test_a_refused_key_names_the_library_the_arch_the_closest_name_and_the_classs_keywords() -> None:
    with pytest.raises(ValueError) as info:
        _check({"widht": 8})
    assert str(info.value) == ("lib arch `tiny` takes no keyword argument `widht`; did you mean `width`?; its model "
                               "class `_Classifier` takes width, pool, img_size")  # num_classes is reserved


def test_a_swallowed_key_is_refused_too() -> None:
    with pytest.raises(ValueError, match=r"^lib arch `tiny` takes no keyword argument `dropuot`; did you mean `dropout`"):
        _check({"dropuot": 0.5}, None, build=_build)


def test_a_key_the_arch_sets_itself_is_named() -> None:
    def fixed(**kwargs: Any) -> nn.Module:
        return _Classifier(width=8, **kwargs)

    with pytest.raises(ValueError, match=r"^lib arch `tiny` sets `width` itself; remove it from the options"):
        _check({"width": 4}, build=fixed)


def test_a_network_that_cannot_run_on_the_input_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^lib arch `tiny` with options \{'pool': False\} cannot run on an input "
                                         r"of 32x32 \(`data.input_size`\): RuntimeError"):
        _check({"pool": False})


def test_a_build_that_fails_for_the_input_size_says_so() -> None:
    with pytest.raises(ValueError) as info:
        _check({"width": 8}, (96, 96), base={"img_size": 96}, size_keys={"img_size"})
    assert str(info.value) == ("lib cannot build `tiny` with options {'width': 8} for an input of 96x96 "
                               "(`data.input_size`): ValueError: img_size 96 is too large")


def test_a_network_without_one_logit_per_class_is_refused_with_the_librarys_hint() -> None:
    with pytest.raises(ValueError) as info:
        _check({}, build=lambda **kw: _Classifier(num_classes=3, **kw), shape_hint="; check the head")
    assert str(info.value) == ("lib arch `tiny` does not return one logit per class (output shape (1, 3), "
                               "expected (1, 10)); check the head")


# -- the [model] table -----------------------------------------------------------------------------------

class _TinyLibrary:
    """The stand-in library as an `ArchLibrary`: arch `tiny` only, `img_size` from the input size."""

    @staticmethod
    def check_arch(arch: str) -> str:
        if arch != "tiny":
            raise ValueError(f"lib has no arch `{arch}`")
        return arch

    @staticmethod
    def check_options(arch: str, options: dict[str, Any], input_size: tuple[int, int] | None) -> dict[str, Any]:
        base = dict(_TinyLibrary.hat_kwargs(arch, input_size))
        return check_options("lib", arch, options, input_size, build=_Classifier, base=base, size_keys={"img_size"})

    @staticmethod
    def hat_kwargs(arch: str, input_size: tuple[int, int] | None) -> tuple[tuple[str, Any], ...]:
        return (("img_size", input_size[0]),) if input_size else ()

    @staticmethod
    def builder(arch: str, num_classes: int) -> Any:
        return functools.partial(_Classifier, num_classes=num_classes)


class _TinyConfig(LibraryArchConfig):
    library = _TinyLibrary


class _TinyFamily(LibraryFamily):
    name = "lib"
    config_class = _TinyConfig
    tiny_arch = "tiny"


def test_the_table_keeps_the_recipes_input_size_and_builds_with_hats_kwargs_then_the_options() -> None:
    config = _TinyConfig.model_validate({"name": "lib", "arch": "tiny", "options": {"width": 8}},
                                        context={"input_size": (48, 48)})
    assert config.input_size == (48, 48) and config.build_kwargs() == {"img_size": 48, "width": 8}
    assert config.model_copy().build_kwargs() == {"img_size": 48, "width": 8}  # the private input size survives
    alone = _TinyConfig(name="lib", arch="tiny")
    assert alone.input_size is None and alone.build_kwargs() == {} and alone.options == {}


def test_options_are_checked_with_the_input_size_and_only_once_the_arch_is_good() -> None:
    with pytest.raises(ValidationError, match="takes no keyword argument `widht`"):
        _TinyConfig.model_validate({"name": "lib", "arch": "tiny", "options": {"widht": 8}}, context={"input_size": (32, 32)})
    with pytest.raises(ValidationError) as info:
        _TinyConfig(name="lib", arch="tyni", options={"widht": 8})
    assert [e["loc"] for e in info.value.errors()] == [("arch",)]


def test_the_family_builds_the_librarys_arch_with_the_datas_class_count_and_the_tables_kwargs() -> None:
    family = _TinyFamily()
    tiny = family.tiny_config()
    assert isinstance(tiny, _TinyConfig) and tiny.arch == "tiny" and tiny.options == {}
    config = _TinyConfig.model_validate({"name": "lib", "arch": "tiny", "options": {"width": 8}},
                                        context={"input_size": (32, 32)})
    model = family.build_float_model(config, 3)
    assert isinstance(model, _Classifier) and model.fc.out_features == 3 and model.conv.out_channels == 8

