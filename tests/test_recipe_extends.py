"""`extends` merges tables, and a recipe can replace a table instead.

`replace = ["model"]` (next to `extends`) makes the named tables of this recipe replace the
base's instead of merging into them; `[model]` is replaced without being asked when its `name`
changes, so a child can switch model family. `--set model.name=...` switches family the same way.
"""

from __future__ import annotations

import pytest

from hatcli.errors import RecipeError
from hatcli.recipe import load_recipe

BASE = """\
task = "base"

[model]
name = "mobilenet_v1"
alpha = 0.5

[float.optimizer]
lr = 0.1
momentum = 0.8
"""


@pytest.fixture
def child(tmp_path):
    (tmp_path / "base.toml").write_text(BASE)

    def make(text: str):
        path = tmp_path / "child.toml"
        path.write_text('extends = "base.toml"\n' + text)
        return path

    return make


def test_child_can_switch_model_family(child):
    lr = load_recipe(child('[model]\nname = "mixvargenet"\nwidth = 0.5\n'))
    assert lr.family.name == "mixvargenet"
    assert lr.resolved["model"]["width"] == 0.5
    assert "alpha" not in lr.resolved["model"]


def test_same_family_still_merges_the_model_table(child):
    lr = load_recipe(child('[model]\nname = "mobilenet_v1"\ndropout = 0.1\n'))
    assert (lr.model.alpha, lr.model.dropout) == (0.5, 0.1)


def test_replace_drops_the_base_table(child):
    lr = load_recipe(child('replace = ["float.optimizer"]\n[float.optimizer]\nlr = 0.01\n'))
    assert lr.recipe.float_.optimizer.lr == 0.01
    assert lr.recipe.float_.optimizer.momentum == 0.9  # the schema default, not the base's 0.8


def test_replace_model_keeps_only_the_childs_keys(child):
    lr = load_recipe(child('replace = ["model"]\n[model]\nname = "mobilenet_v1"\n'))
    assert lr.model.alpha == 1.0


def test_replace_is_not_kept_in_the_resolved_recipe(child):
    assert "replace" not in load_recipe(child('replace = ["model"]\n[model]\nname = "mobilenet_v1"\n')).resolved


def test_replace_of_a_table_the_child_does_not_set_is_an_error(child):
    path = child('replace = ["float.optimzer"]\n[float.optimizer]\nlr = 0.01\n')
    with pytest.raises(RecipeError, match=rf"{path.resolve()}:2: .*`float.optimzer`.*did you mean `float.optimizer`"):
        load_recipe(path)


@pytest.mark.parametrize(("value", "expected"), [('"model"', "must be a list of dotted table names"),
                                                 ("[1]", "must be a list of dotted table names"),
                                                 ('["model..x"]', "not a table of this recipe")])
def test_malformed_replace_is_an_error(child, value, expected):
    with pytest.raises(RecipeError, match=rf"child.toml:2: `replace`.*{expected}"):
        load_recipe(child(f"replace = {value}\n[model]\nname = 'mobilenet_v1'\n"))


def test_set_model_name_switches_family_whatever_the_order(child):
    lr = load_recipe(child(""), ["model.width=0.5", "model.name=mixvargenet"])
    assert lr.family.name == "mixvargenet" and lr.resolved["model"]["width"] == 0.5


def test_errors_in_a_replaced_table_point_at_the_child(child):
    path = child('[model]\nname = "mixvargenet"\nwidht = 0.5\n')
    with pytest.raises(RecipeError, match=rf"{path.resolve()}:4: unknown key `model.widht`; did you mean `width`"):
        load_recipe(path)
