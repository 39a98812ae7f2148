"""docs/plugins.md stays true to the plugin API: every member of a family is in its table, marked
required exactly when hat cannot do without it, every FamilyConfig field and every hook is named,
and the pyproject.toml it shows is one a build frontend accepts."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import pytest

from hatcli.family import FamilyConfig, ModelFamily
from hatcli.plugins import HOOKS

DOC = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()


def _table_rows(first_header: str) -> dict[str, list[str]]:
    """Rows of the markdown table whose first header cell is `first_header`, keyed by member name."""
    lines = DOC.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        name = re.match(r"`(\w+)", cells[0])
        assert name, f"row without a `member`: {line}"
        rows[name.group(1)] = cells
    return rows


def _family_members() -> dict[str, bool]:
    """Every public member of ModelFamily -> whether a family must provide it."""
    members = {name: name in ModelFamily.__abstractmethods__ for name in vars(ModelFamily) if not name.startswith("_")}
    for name in inspect.get_annotations(ModelFamily):
        members.setdefault(name, True)  # declared without a default: each family sets it
        members[name] = members[name] and name not in vars(ModelFamily)
    return members


def test_every_family_member_is_documented_as_required_or_optional():
    rows = _table_rows("member")
    members = _family_members()
    assert set(rows) == set(members)
    for name, required in members.items():
        assert rows[name][1] == ("required" if required else "optional"), name


@pytest.mark.parametrize("member", ["tiny_config", "min_input_size", "description"])
def test_members_the_tests_and_listing_use_say_what_they_are_for(member):
    assert len(_table_rows("member")[member][2].split()) >= 8


def test_every_family_config_field_is_documented():
    assert set(_table_rows("field")) == set(FamilyConfig.model_fields)
    assert "already has `name`" in DOC


def test_every_hook_is_named():
    for hook in HOOKS:
        assert f"`{hook}(register)`" in DOC


def test_the_example_pyproject_has_a_build_system_table():
    blocks = re.findall(r"```toml\n(.*?)```", DOC, flags=re.S)
    pyproject = next(tomllib.loads(block) for block in blocks if "[build-system]" in block)
    assert pyproject["build-system"]["requires"] and pyproject["build-system"]["build-backend"]
    assert "hat.plugins" in pyproject["project"]["entry-points"]


def test_the_guide_says_hats_test_suite_runs_every_installed_family():
    assert "tests/test_families.py" in DOC and "every installed family" in DOC
