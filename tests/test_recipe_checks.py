"""A recipe is checked whole when it is loaded, before any stage starts.

Names that registries own (march, transforms, callbacks, packers) are looked up, their arguments
are checked, every number must be finite, seeds must fit numpy and torch, and values keep their
TOML type (a string is not a number, a boolean is not an integer). Every error names the file, the
line where it is known, the dotted key and, for a misspelt name, the closest valid one; the CLI
exits 2.
"""

from __future__ import annotations

import pytest

from hatcli.errors import RecipeError
from hatcli.recipe import load_recipe

BASE = """\
task = "checks"

[data]
root = "data/x"
train_transforms = [{ name = "RandomHorizontalFlip" }]

[model]
name = "mobilenet_v1"

[float.optimizer]
lr = 0.05

[quant]
march = "nash_e"
"""


@pytest.fixture
def recipe(tmp_path):
    """Write BASE with `old` replaced by `new` and return its path."""

    def make(old: str = "", new: str = "", text: str = BASE):
        path = tmp_path / "r.toml"
        path.write_text(text.replace(old, new) if old else text)
        return path

    return make


def error_of(path, overrides=None) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides or [])
    return str(err.value)


# -- names that registries own ---------------------------------------------------------------


def test_unknown_march_names_file_line_key_and_closest_march(recipe):
    path = recipe('march = "nash_e"', 'march = "nash_ee"')
    message = error_of(path)
    assert f"{path.resolve()}:14" in message
    assert "`quant.march`" in message
    assert "did you mean `nash_e`?" in message


def test_unknown_march_from_set_is_refused_before_any_stage(recipe):
    message = error_of(recipe(), ["quant.march=bayse"])
    assert message.startswith("--set: `quant.march`")
    assert "did you mean `bayes`?" in message


def test_int16_patterns_on_a_march_without_int16_are_refused_up_front(recipe):
    message = error_of(recipe(), ["quant.march=host", 'quant.int16=["features.1.*"]'])
    assert "`quant.int16`" in message and "host" in message


def test_unknown_transform_names_the_list_entry_and_closest_name(recipe):
    path = recipe("RandomHorizontalFlip", "RandomHorizontalFlop")
    message = error_of(path)
    assert f"{path.resolve()}:5" in message
    assert "data.train_transforms[0].name" in message
    assert "did you mean `RandomHorizontalFlip`?" in message


def test_bad_transform_argument_names_the_argument(recipe):
    path = recipe('{ name = "RandomHorizontalFlip" }', '{ name = "RandomHorizontalFlip", p = 2 }')
    message = error_of(path)
    assert f"{path.resolve()}:5" in message
    assert "data.train_transforms[0].p" in message


def test_unknown_transform_argument_suggests_the_closest(recipe):
    message = error_of(recipe('{ name = "RandomHorizontalFlip" }', '{ name = "RandomHorizontalFlip", pp = 0.5 }'))
    assert "did you mean `p`?" in message


def test_non_batch_transform_in_batch_transforms_is_refused(recipe):
    message = error_of(recipe(), ['data.batch_transforms=[{name = "RandomHorizontalFlip"}]'])
    assert "data.batch_transforms[0].name" in message


def test_unknown_callback_names_the_key_and_closest_callback(recipe):
    message = error_of(recipe(), ['qat.callbacks=[{name = "early_stoping"}]'])
    assert "qat.callbacks[0].name" in message
    assert "did you mean `early_stopping`?" in message


@pytest.mark.parametrize("args", ["patiense = 3", "patience = 0", "patience = true", 'min_delta = "x"', "min_delta = -1"])
def test_bad_callback_arguments_are_refused(recipe, args):
    message = error_of(recipe(), [f'float.callbacks=[{{name = "early_stopping", {args}}}]'])
    assert "float.callbacks[0]" in message and "early_stopping" in message


def test_good_callback_arguments_load(recipe):
    lr = load_recipe(recipe(), ['float.callbacks=[{name = "early_stopping", patience = 3}]'])
    assert lr.recipe.float_.callbacks == [{"name": "early_stopping", "patience": 3}]


def test_unknown_pack_kind_names_the_key_and_closest_packer(recipe):
    message = error_of(recipe(), ["data.pack.kind=imagenett"])
    assert "`data.pack.kind`" in message
    assert "did you mean `imagenet`?" in message


# -- numbers and types -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numbers_are_refused_with_file_and_line(recipe, value):
    path = recipe("lr = 0.05", f"lr = {value}")
    message = error_of(path)
    assert f"{path.resolve()}:11" in message
    assert "`float.optimizer.lr`" in message and "finite" in message


def test_whole_number_too_large_for_a_float_is_refused(recipe):
    message = error_of(recipe(), [f"float.optimizer.lr={10**400}"])
    assert message.startswith("--set: `float.optimizer.lr`: must be a finite number")


def test_non_finite_numbers_inside_lists_and_model_tables_are_refused(recipe):
    assert "data.mean[1]" in error_of(recipe(), ["data.mean=[1.0, nan, 1.0]"])
    assert "`model.alpha`" in error_of(recipe(), ["model.alpha=inf"])


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**64)])
def test_seeds_outside_numpy_and_torch_range_are_refused(recipe, seed):
    assert "`seed`" in error_of(recipe(), [f"seed={seed}"])
    assert "`data.pack.seed`" in error_of(recipe(), [f"data.pack.seed={seed}"])


def test_largest_valid_seed_loads(recipe):
    assert load_recipe(recipe(), [f"seed={2**32 - 1}"]).recipe.seed == 2**32 - 1


def test_a_string_is_not_a_number(recipe):
    path = recipe("lr = 0.05", 'lr = "0.05"')
    message = error_of(path)
    assert f"{path.resolve()}:11" in message and "`float.optimizer.lr`" in message


@pytest.mark.parametrize("override", ["float.epochs=true", "float.epochs=2.0", "float.optimizer.lr=true",
                                      "model.alpha=\"0.5\"", "deterministic=1", "task=7"])
def test_set_values_keep_their_toml_type(recipe, override):
    assert error_of(recipe(), [override]).startswith("--set: ")


def test_set_string_for_a_text_key_explains_how_to_quote(recipe):
    assert "quote" in error_of(recipe(), ["task=7"])


def test_whole_numbers_are_accepted_for_float_keys(recipe):
    lr = load_recipe(recipe("lr = 0.05", "lr = 1"), ["float.epochs=3", "model.alpha=1"])
    assert (lr.recipe.float_.optimizer.lr, lr.recipe.float_.epochs, lr.model.alpha) == (1.0, 3, 1.0)


def test_a_toml_date_is_not_a_string(recipe):
    assert "`data.root`" in error_of(recipe('root = "data/x"', "root = 2024-01-01"))


def test_misspelt_choice_suggests_the_closest(recipe):
    message = error_of(recipe(), ["device=cdua"])
    assert "`device`" in message and "did you mean `cuda`?" in message


def test_the_cli_exits_2_on_every_check(hat, recipe):
    result = hat("recipe", "validate", recipe('march = "nash_e"', 'march = "nash_ee"'))
    assert result.code == 2
    assert "did you mean `nash_e`?" in result.err and "Traceback" not in result.err
    assert hat("recipe", "validate", recipe(), "--set", "float.epochs=true").code == 2


@pytest.mark.parametrize("text", ["a\\u0000b", "runs\\u0000"])
def test_text_with_a_nul_is_refused(recipe, text):
    assert "`work_dir`" in error_of(recipe(), [f'work_dir="{text}"'])


def test_set_value_from_undecodable_bytes_is_refused(recipe):
    value = b"runs\xff".decode("utf-8", "surrogateescape")  # what argv holds for such bytes
    assert "not UTF-8" in error_of(recipe(), [f"work_dir={value}"])


@pytest.fixture
def plugin_callback(fresh_plugins):
    """Register a plugin callback whose constructor refuses its argument with SystemExit."""
    from hatcli.family import CallbackSpec
    from hatcli.plugins import callbacks

    def refuses(level: int = 0):
        raise SystemExit(f"level {level} is not supported")

    callbacks().register("refuses", CallbackSpec("refuses", "always refuses", refuses), owner="test")


def test_a_plugin_callback_that_refuses_its_arguments_is_a_recipe_error(recipe, plugin_callback):
    message = error_of(recipe(), ['float.callbacks=[{name = "refuses", level = 3}]'])
    assert "float.callbacks[0]" in message and "level 3 is not supported" in message
