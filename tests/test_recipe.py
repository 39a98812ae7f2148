"""Recipes: inheritance, overrides, and an error for every way a recipe can be wrong."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from hatcli.errors import RecipeError
from hatcli.recipe import find_key_line, load_recipe, parse_override

BASE = """
task = "base"

[data]
root = "data/x"
batch_size = 8

[model]
name = "mobilenet_v1"
alpha = 0.5

[float]
epochs = 3

[float.optimizer]
lr = 0.1
momentum = 0.9
"""


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.toml"
    path.write_text(BASE)
    return path


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_extends_deep_merges_tables(tmp_path, base):
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\ntask = "child"\n[float.optimizer]\nlr = 0.01\n')
    lr = load_recipe(child)
    assert lr.recipe.task == "child"
    assert lr.recipe.float_.optimizer.lr == 0.01
    assert lr.recipe.float_.optimizer.momentum == 0.9  # kept from the base
    assert lr.recipe.float_.epochs == 3
    assert lr.model.alpha == 0.5


def test_extends_chains_and_resolves_relative_to_each_file(tmp_path, base):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "sub/mid.toml", 'extends = "../base.toml"\n[data]\nbatch_size = 4\n')
    top = write(tmp_path, "sub/top.toml", 'extends = "mid.toml"\n[model]\nalpha = 0.25\n')
    lr = load_recipe(top)
    assert (lr.recipe.data.batch_size, lr.model.alpha, lr.recipe.data.root) == (4, 0.25, "data/x")


def test_extends_loop_is_an_error(tmp_path):
    write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    write(tmp_path, "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(RecipeError, match="loops"):
        load_recipe(tmp_path / "a.toml")


def test_set_overrides_parse_toml_values(base):
    lr = load_recipe(base, ["float.epochs=7", "data.root=/tmp/my data", "model.alpha=0.75",
                            "data.input_size=[48, 48]", "qat.enabled=false"])
    assert lr.recipe.float_.epochs == 7
    assert lr.recipe.data.root == "/tmp/my data"  # not valid TOML: taken as a string
    assert lr.model.alpha == 0.75
    assert lr.recipe.data.input_size == (48, 48)
    assert lr.recipe.qat.enabled is False


def test_set_never_evaluates_code(base):
    lr = load_recipe(base, ["data.root=__import__('os').getcwd()"])
    assert lr.recipe.data.root == "__import__('os').getcwd()"


@pytest.mark.parametrize("text", ["noequals", "=3", "a..b=1", "a b=1"])
def test_malformed_set_is_an_error(text):
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_override(text)


def test_set_into_a_value_is_an_error(base):
    with pytest.raises(RecipeError, match="is a value, not a table"):
        load_recipe(base, ["task.name=x"])


def test_misspelt_key_names_file_line_key_and_suggestion(tmp_path, base):
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n\n[float.optimizer]\nlrr = 0.01\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(child)
    message = str(err.value)
    assert f"{child.resolve()}:4" in message
    assert "`float.optimizer.lrr`" in message
    assert "did you mean `lr`?" in message


def test_misspelt_key_in_the_base_names_the_base_file(tmp_path):
    write(tmp_path, "base.toml", BASE.replace("batch_size = 8", "batch_sise = 8"))
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(child)
    assert f"{(tmp_path / 'base.toml').resolve()}:6" in str(err.value)
    assert "did you mean `batch_size`?" in str(err.value)


def test_misspelt_key_from_set_says_so(base):
    with pytest.raises(RecipeError, match=r"--set: unknown key `float.epoch`; did you mean `epochs`"):
        load_recipe(base, ["float.epoch=2"])


def test_family_validates_its_own_model_table(base):
    with pytest.raises(RecipeError, match=r"unknown key `model.alpah`; did you mean `alpha`"):
        load_recipe(base, ["model.alpah=1.0"])


def test_unknown_family_suggests_the_closest(base):
    with pytest.raises(RecipeError, match="(?i)did you mean `mobilenet_v1`"):
        load_recipe(base, ["model.name=mobilenetv1"])


def test_wrong_type_names_the_key_and_value(base):
    with pytest.raises(RecipeError, match=r"`float.epochs`: .*integer.*'ten'"):
        load_recipe(base, ["float.epochs=ten"])


def test_out_of_range_value(base):
    with pytest.raises(RecipeError, match="deploy.opt"):
        load_recipe(base, ["deploy.opt=7"])


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "r.toml", '[model]\nname = "mobilenet_v1"\n')
    with pytest.raises(RecipeError, match="missing required key `task`"):
        load_recipe(path)


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "bad.toml", "task = \n")
    with pytest.raises(RecipeError, match="bad.toml:1: invalid TOML"):
        load_recipe(path)


def test_missing_model_name(tmp_path):
    path = write(tmp_path, "r.toml", 'task = "x"\n[model]\nalpha = 1.0\n')
    with pytest.raises(RecipeError, match="`model.name` must name a model family"):
        load_recipe(path)


def test_find_key_line_handles_tables_and_dotted_keys():
    text = 'a = 1\n[b]\nc = 2\n[b.d]\ne = 3\nf.g = 4\n'
    assert find_key_line(text, "a") == 1
    assert find_key_line(text, "b.c") == 3
    assert find_key_line(text, "b.d") == 4
    assert find_key_line(text, "b.d.e") == 5
    assert find_key_line(text, "b.d.f.g") == 6
    assert find_key_line(text, "zzz") is None


def test_recipe_show_prints_the_resolved_recipe(hat, base):
    result = hat("recipe", "show", base, "--set", "float.epochs=5")
    assert result.code == 0, result.err
    data = tomllib.loads(result.out)
    assert data["float"]["epochs"] == 5
    assert data["model"] == {"name": "mobilenet_v1", "alpha": 0.5, "stem_stride": 2, "dropout": 0.0}
    assert data["calibration"]["num_batches"] > 0  # defaults are filled in


def test_resolved_recipe_is_stable(base):
    assert load_recipe(base).sha256 == load_recipe(base).sha256
    assert load_recipe(base).sha256 != load_recipe(base, ["float.epochs=4"]).sha256


def test_cli_recipe_error_exits_2_with_the_key(hat, tmp_path, base):
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n[float]\nepohcs = 1\n')
    result = hat("recipe", "validate", child)
    assert result.code == 2
    assert "did you mean `epochs`?" in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    assert load_recipe(recipe).recipe.task
