"""Recipe strings that become one folder name stay one folder name.

`task` names the run folder `<work_dir>/<task>`, and `data.train` / `data.val` name databases
inside `data.root`: each must be one safe path component, so no recipe can send outputs outside
`work_dir` (or read a database outside `data.root`) by a name like `..`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hatcli.errors import RecipeError
from hatcli.recipe import load_recipe

RECIPE = 'task = "ok"\n[model]\nname = "mobilenet_v1"\n'

UNSAFE = [".", "..", "", "a/b", "../up", "a\\b", "-rf", ".hidden", "a\x00b", "x" * 256, "a b", "tab\t"]


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(RECIPE)
    return p


def quoted(value: str) -> str:
    """`value` as a TOML basic string (escapes NUL, tabs and backslashes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\x00", "\\u0000").replace("\t", "\\t")
    return f'"{escaped}"'


@pytest.mark.parametrize("key", ["task", "data.train", "data.val"])
@pytest.mark.parametrize("value", UNSAFE, ids=repr)
def test_unsafe_folder_names_are_refused(path, key, value):
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [f"{key}={quoted(value)}"])
    assert f"`{key}`" in str(err.value)
    assert "one folder name" in str(err.value) or "NUL" in str(err.value)


def test_dot_task_in_the_file_names_file_and_line(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('# a comment\ntask = ".."\n[model]\nname = "mobilenet_v1"\n')
    with pytest.raises(RecipeError, match=rf"{recipe.resolve()}:2: `task`"):
        load_recipe(recipe)


@pytest.mark.parametrize("value", ["quickstart", "run-2.1", "A_b.c", "x" * 255])
def test_ordinary_names_are_accepted(path, value):
    assert load_recipe(path, [f"task={quoted(value)}"]).run_dir == Path("runs") / value
