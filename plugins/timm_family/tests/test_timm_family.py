"""The `timm` family: archs resolved through timm's own registry, options checked against what the
arch's constructor really takes, the input size handed to archs of a fixed input size, nothing
downloaded, hat working without timm, and a tiny run through calibration."""

from __future__ import annotations

import functools
import sys

import pytest
import torch

from hat_timm.family import TimmConfig, TimmFamily
from hatcli.plugins import families, load_plugins
from hatcli.testing import library_recipe, refusing_downloads, run_hat, tiny_run


timm = pytest.importorskip("timm")
import timm.models._builder  # noqa: E402  (after the importorskip)

FAMILY = TimmFamily()
recipe = functools.partial(library_recipe, family="timm", task="timm_tiny", arch="mobilenetv3_small_050",
                           options="{ drop_rate = 0.1 }")
"""`recipe(tmp_path, arch=..., options=..., size=...)`: a recipe file of the timm family in `tmp_path`."""
no_download = refusing_downloads("timm", (timm.models._builder, "load_pretrained"))
"""Make timm's weight download an error, so a test fails if hat asked for weights."""


# -- the registry ----------------------------------------------------------------------------------

def test_the_plugin_registers_the_family() -> None:
    assert families().owner("timm") == "timm"
    assert isinstance(families().get("timm"), TimmFamily)


def test_the_arch_is_built_by_timms_own_create_model_with_the_datas_class_count(no_download) -> None:
    config = TimmConfig(name="timm", arch="mobilenetv3_small_050", options={"drop_rate": 0.25})
    model = FAMILY.build_float_model(config, 7)
    reference = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=7, drop_rate=0.25)
    assert type(model) is type(reference) and model.num_classes == 7 and model.drop_rate == 0.25
    assert [tuple(p.shape) for p in model.parameters()] == [tuple(p.shape) for p in reference.parameters()]
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_an_unknown_arch_exits_2_naming_the_closest_registered_names(capsys, tmp_path) -> None:
    code, _, err = run_hat(capsys, "recipe", "validate", recipe(tmp_path, arch="mobilenetv3_smal_050"))
    assert code == 2
    assert "`model.arch`" in err and "timm has no arch `mobilenetv3_smal_050`" in err
    assert "`mobilenetv3_small_050`" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_an_option_the_constructor_does_not_take_exits_2_naming_key_and_arch(capsys, tmp_path) -> None:
    code, _, err = run_hat(capsys, "recipe", "validate", recipe(tmp_path, options="{ drop_rat = 0.1 }"))
    assert code == 2
    assert "`model.options`" in err and "`mobilenetv3_small_050`" in err
    assert "no keyword argument `drop_rat`; did you mean `drop_rate`?" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("key, says", [("num_classes", "`model.num_classes`"), ("pretrained", "never downloads"),
                                       ("img_size", "`data.input_size`")])
def test_keys_hat_sets_itself_are_refused_in_options(capsys, tmp_path, key, says) -> None:
    code, _, err = run_hat(capsys, "recipe", "validate", recipe(tmp_path, options=f"{{ {key} = 3 }}"))
    assert code == 2 and f"`{key}` cannot be set here" in err and says in err


def test_a_network_that_cannot_run_on_the_recipes_input_is_refused_at_load(capsys, tmp_path) -> None:
    """Without pooling, the classifier meets a 512 x 1 x 1 map: the one run at load finds it."""
    code, _, err = run_hat(capsys, "recipe", "validate", recipe(tmp_path, arch="resnet10t", options='{ global_pool = "" }'))
    assert code == 2 and "`resnet10t`" in err and "cannot run on an input of 32x32 (`data.input_size`)" in err


def test_an_arch_of_fixed_input_size_is_built_for_the_recipes_input_size(tmp_path, no_download) -> None:
    from hatcli.recipe import load_recipe

    lr = load_recipe(recipe(tmp_path, arch="vit_tiny_patch16_224", options="{}", size=(32, 48)))
    assert lr.model.input_size == (32, 48) and lr.model.build_kwargs() == {"img_size": (32, 48)}
    model = lr.family.build_float_model(lr.model, 3).eval()
    assert model(torch.zeros(1, 3, 32, 48)).shape == (1, 3)
    assert lr.model.model_copy().build_kwargs() == {"img_size": (32, 48)}  # the private input size survives a copy


# -- without timm ------------------------------------------------------------------------------------

def test_without_timm_the_family_registers_and_a_recipe_naming_it_says_how_to_install(capsys, tmp_path,
                                                                                      monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "hat_timm" or m.startswith("hat_timm.")]:
        monkeypatch.delitem(sys.modules, name)  # imported again, with timm gone
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import timm` raises ImportError
    try:
        load_plugins(reload=True)
        assert "timm" in families()
        code, _, err = run_hat(capsys, "recipe", "validate", recipe(tmp_path))
        assert code == 2 and "pip install timm" in err and "`model.arch`" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        monkeypatch.undo()
        load_plugins(reload=True)


# -- a tiny run ---------------------------------------------------------------------------------------

def test_a_tiny_run_trains_with_the_datas_class_count_and_calibrates(capsys, tmp_path, no_download) -> None:
    state = tiny_run(capsys, tmp_path, "timm", "timm_tiny", "resnet10t", "{ drop_rate = 0.1 }")
    assert state["num_classes"] == 6  # the shapes dataset's classes, not timm's 1000
    assert state["model"]["fc.weight"].shape[0] == 6
