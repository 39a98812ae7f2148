"""`hat recipe show` / `validate`: examples in --help, and --json for scripts.

`show --json` prints the resolved recipe as one JSON object; `validate --json` prints
`{"valid": true, "recipe", "family", "sha256"}`. An invalid recipe still exits 2 with the error
on stderr and nothing on stdout.
"""

from __future__ import annotations

import pytest

from hatcli.recipe import load_recipe

RECIPE = 'task = "cli"\n[model]\nname = "mobilenet_v1"\nalpha = 0.5\n'


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    return path


@pytest.mark.parametrize("args", [("recipe", "--help"), ("recipe", "show", "--help"),
                                  ("recipe", "validate", "--help")])
def test_help_shows_examples_with_json(hat, args):
    result = hat(*args)
    assert result.code == 0
    assert "Examples" in result.out and "--json" in result.out
    assert "hat recipe validate recipes/quickstart.toml" in result.out


def test_show_json_is_the_resolved_recipe(hat, recipe):
    result = hat("recipe", "show", recipe, "--json", "--set", "float.epochs=4")
    assert result.code == 0, result.err
    data = result.json()
    assert data == load_recipe(recipe, ["float.epochs=4"]).resolved
    assert data["float"]["epochs"] == 4 and data["model"]["alpha"] == 0.5


def test_validate_json_names_recipe_family_and_hash(hat, recipe):
    result = hat("recipe", "validate", recipe, "--json")
    assert result.code == 0, result.err
    assert result.json() == {"valid": True, "recipe": str(recipe), "family": "mobilenet_v1",
                             "sha256": load_recipe(recipe).sha256}


@pytest.mark.parametrize("command", ["show", "validate"])
def test_invalid_recipe_with_json_exits_2_with_the_error_on_stderr(hat, recipe, command):
    result = hat("recipe", command, recipe, "--json", "--set", "float.epochs=true")
    assert result.code == 2
    assert result.out == ""
    assert "`float.epochs`" in result.err
