"""The `torchvision` family: archs resolved through torchvision's own model registry, options checked
against what the builder really takes (also where the model class swallows unknown keys), the input
size handed to ViT / MaxViT, nothing downloaded, and a tiny run through calibration."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision

from hat_torchvision.family import TorchvisionConfig, TorchvisionFamily
from hatcli.plugins import families
from hatcli.testing import library_recipe, refusing_downloads, run_hat, tiny_run


FAMILY = TorchvisionFamily()
recipe = functools.partial(library_recipe, family="torchvision", task="tv_tiny", arch="mobilenet_v2",
                           options="{ width_mult = 0.5 }")
"""`recipe(tmp_path, arch=..., options=..., size=...)`: a recipe file of the torchvision family in `tmp_path`."""
no_download = refusing_downloads("torchvision", (torchvision.models._api, "load_state_dict_from_url"))
"""Make torchvision's weight download an error, so a test fails if hat asked for weights."""


def test_the_plugin_registers_the_family() -> None:
    assert families().owner("torchvision") == "torchvision"
    assert isinstance(families().get("torchvision"), TorchvisionFamily)


def test_the_arch_is_built_by_torchvisions_get_model_with_the_datas_class_count(no_download) -> None:
    config = TorchvisionConfig(name="torchvision", arch="mobilenet_v2", options={"width_mult": 0.5, "dropout": 0.3})
    model = FAMILY.build_float_model(config, 7)
    reference = torchvision.models.get_model("mobilenet_v2", weights=None, num_classes=7, width_mult=0.5)
    assert type(model) is type(reference)
    assert [tuple(p.shape) for p in model.parameters()] == [tuple(p.shape) for p in reference.parameters()]
    assert model.classifier[0].p == 0.3 and model.classifier[1].out_features == 7


def test_an_unknown_arch_exits_2_naming_the_closest_registered_names(capsys, tmp_path) -> None:
    code, _, err = run_hat(capsys, "recipe", "validate", recipe(tmp_path, arch="mobilnet_v2"))
    assert code == 2 and "`model.arch`" in err and "`mobilenet_v2`" in err
    assert len(err.strip().splitlines()) == 1


def test_a_model_of_another_task_is_named_as_such(capsys, tmp_path) -> None:
    code, _, err = run_hat(capsys, "recipe", "validate", recipe(tmp_path, arch="fasterrcnn_resnet50_fpn", options="{}"))
    assert code == 2 and "is a detection model" in err


def test_an_option_the_builder_does_not_take_exits_2_naming_key_and_arch(capsys, tmp_path) -> None:
    code, _, err = run_hat(capsys, "recipe", "validate", recipe(tmp_path, options="{ widht_mult = 0.5 }"))
    assert code == 2 and "`model.options`" in err and "`mobilenet_v2`" in err
    assert "no keyword argument `widht_mult`; did you mean `width_mult`?" in err


def test_an_option_the_model_class_swallows_is_refused_too(capsys, tmp_path) -> None:
    """MobileNetV3's constructor takes `**kwargs` and ignores them: a typo would build silently."""
    code, _, err = run_hat(capsys, "recipe", "validate", recipe(tmp_path, arch="mobilenet_v3_small",
                                                    options="{ width_mult = 0.5, widht_mult = 1.0 }"))
    assert code == 2 and "no keyword argument `widht_mult`" in err and "`mobilenet_v3_small`" in err


@pytest.mark.parametrize("key, says", [("num_classes", "`model.num_classes`"), ("weights", "never downloads"),
                                       ("image_size", "`data.input_size`")])
def test_keys_hat_sets_itself_are_refused_in_options(capsys, tmp_path, key, says) -> None:
    code, _, err = run_hat(capsys, "recipe", "validate", recipe(tmp_path, options=f"{{ {key} = 3 }}"))
    assert code == 2 and f"`{key}` cannot be set here" in err and says in err


def test_vit_is_built_for_the_recipes_input_size_and_non_square_is_refused(capsys, tmp_path, no_download) -> None:
    from hatcli.recipe import load_recipe

    lr = load_recipe(recipe(tmp_path, arch="vit_b_32", options="{}", size=(64, 64)))
    assert lr.model.build_kwargs() == {"image_size": 64}
    code, _, err = run_hat(capsys, "recipe", "validate", recipe(tmp_path, arch="vit_b_32", options="{}", size=(32, 64)))
    assert code == 2 and "square inputs only" in err


def test_auxiliary_classifiers_are_off(no_download) -> None:
    config = TorchvisionConfig(name="torchvision", arch="googlenet")
    assert config.build_kwargs() == {"aux_logits": False}
    model = FAMILY.build_float_model(config, 4).train()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)  # logits in training too, not GoogLeNetOutputs


def test_a_tiny_run_trains_with_the_datas_class_count_and_calibrates(capsys, tmp_path, no_download) -> None:
    state = tiny_run(capsys, tmp_path, "torchvision", "tv_tiny", "resnet18", "{ zero_init_residual = true }")
    assert state["num_classes"] == 6 and state["model"]["fc.weight"].shape[0] == 6
