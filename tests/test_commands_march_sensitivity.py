"""`hat march list|show` and `hat sensitivity`, and the `hat check` flags they replace (still accepted)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from hatcli.quant.march import SHIPPED_MARCHES

SENSITIVITY = "hatcli.workflows.sensitivity"
"""The module that measures per-layer sensitivity (the one `hat sensitivity` calls)."""

MARCHES = list(SHIPPED_MARCHES)


def test_root_help_lists_march_and_sensitivity(hat):
    result = hat("--help")
    assert result.code == 0
    assert "march " in result.out and "sensitivity " in result.out


@pytest.mark.parametrize("command", ["march", "march list", "march show", "sensitivity"])
def test_new_commands_have_help_with_examples(hat, command):
    result = hat(*command.split(), "--help")
    assert result.code == 0, result.err
    assert "Examples:" in result.out and f"hat {command.split()[0]} " in result.out
    assert "<bool>" not in result.out


def test_check_help_shows_only_the_op_check(hat):
    result = hat("check", "--help")
    assert result.code == 0, result.err
    for old in ("--list-marches", "--sensitivity", "--batches"):
        assert old not in result.out
    examples = result.out[result.out.index("Examples:"):]
    commands = [line.strip() for line in examples.splitlines() if line.strip().startswith("hat ")]
    assert commands and all(c.startswith("hat check ") for c in commands)


def test_march_list_shows_every_march(hat):
    table = hat("march", "list")
    assert table.code == 0, table.err
    for column in ("march", "chip", "int8 TOPS", "activations", "float output", "latency"):
        assert column in table.out
    assert all(name in table.out for name in MARCHES)
    listed = hat("march", "list", "--json")
    assert listed.code == 0 and [m["name"] for m in listed.json()] == MARCHES


def test_march_show_gives_the_rules_and_op_limits(hat):
    profile = hat("march", "show", "nash_e", "--json").json()
    assert profile["name"] == "nash_e" and profile["int8_tops"] == 80
    assert profile["quant"]["activation_dtypes"] == ["int8", "int16"] and profile["ops"]["Conv"]["max_kernel"] == 9
    table = hat("march", "show", "bayes")
    assert table.code == 0, table.err
    assert table.out.startswith("bayes (") and "max kernel" in table.out and "Conv" in table.out


def test_an_unknown_march_exits_2_with_one_line(hat):
    result = hat("march", "show", "nash_ee")
    assert result.code == 2 and result.out == ""
    assert result.err.strip().splitlines() == [
        "error: unknown march `nash_ee`. Did you mean `nash_e`? Available: " + ", ".join(MARCHES)]
    assert hat("march", "show").code == 2  # NAME is required


@pytest.mark.parametrize(("old", "new", "note"), [
    ("check --list-marches", "march list", "`hat check --list-marches` is now `hat march list`"),
    ("check --list-marches --json", "march list --json", "`hat check --list-marches` is now `hat march list`"),
    ("check --list-marches --march nash_e", "march show nash_e", "is now `hat march show NAME`"),
    ("check --list-marches --march host --json", "march show host --json", "is now `hat march show NAME`"),
])
def test_the_old_march_spelling_prints_the_same_and_names_the_new_one(hat, old, new, note):
    before, after = hat(*old.split()), hat(*new.split())
    assert before.code == after.code == 0, before.err
    assert before.out == after.out
    assert after.err == ""
    notes = before.err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("warning: ") and note in notes[0]


@pytest.fixture
def fake_report(monkeypatch, tiny_recipe: Path) -> list[int | None]:
    """Replace the measurement by a fixed two-layer report; returns the `batches` each call asked for."""
    sensitivity = importlib.import_module(SENSITIVITY)
    rows = [sensitivity.LayerSensitivity("features.3.0.0", "conv2d+relu", "uint8", 0.0, 31.5, 50.0),
            sensitivity.LayerSensitivity("classifier", "linear", "int32", 1.5, 40.25, 48.5)]
    report = sensitivity.SensitivityReport(str(tiny_recipe), "top1", 50.0, 1, 16, sensitivity.rank(rows))
    asked: list[int | None] = []

    def layer_sensitivity(lr, batches=None):
        asked.append(batches)
        return report

    monkeypatch.setattr(sensitivity, "layer_sensitivity", layer_sensitivity)
    return asked


def test_sensitivity_ranks_the_layers(hat, tiny_recipe, fake_report):
    table = hat("sensitivity", tiny_recipe)
    assert table.code == 0, table.err
    lines = [line for line in table.out.splitlines() if "classifier" in line or "features.3.0.0" in line]
    assert "classifier" in lines[0] and "+1.50" in lines[0] and "features.3.0.0" in lines[1]
    assert "reference (every fake quant off): top1 50.00" in table.out
    report = hat("sensitivity", tiny_recipe, "--batches", "2", "--json").json()
    assert [row["layer"] for row in report["layers"]] == ["classifier", "features.3.0.0"]
    assert fake_report == [None, 2]


@pytest.mark.parametrize("extra", [[], ["--json"], ["--batches", "3"], ["--set", "data.batch_size=8", "--json"]])
def test_the_old_sensitivity_spelling_prints_the_same_and_names_the_new_one(hat, tiny_recipe, fake_report, extra):
    before = hat("check", tiny_recipe, "--sensitivity", *extra)
    after = hat("sensitivity", tiny_recipe, *extra)
    assert before.code == after.code == 0, before.err
    assert before.out == after.out and after.err == ""
    assert before.err.strip().splitlines() == [
        "warning: `hat check RECIPE --sensitivity` is now `hat sensitivity RECIPE`"]
    assert fake_report[0] == fake_report[1]


def test_the_old_spelling_still_refuses_another_march(hat, tiny_recipe, fake_report):
    result = hat("check", tiny_recipe, "--sensitivity", "--march", "bayes")
    assert result.code == 2 and "--set quant.march=bayes" in result.err and fake_report == []
    assert hat("check", tiny_recipe, "--batches", "2").code == 2  # --batches belongs to --sensitivity


def test_sensitivity_takes_a_recipe_and_its_march(hat, tiny_recipe, fake_report):
    assert hat("sensitivity").code == 2
    assert hat("sensitivity", tiny_recipe, "--march", "nash_e").code == 2  # the recipe's march, no option
    assert fake_report == []


def test_sensitivity_without_calibration_says_how_to_make_it(hat, tiny_recipe):
    result = hat("sensitivity", tiny_recipe)
    assert result.code == 1 and result.out == ""
    assert f"hat train {tiny_recipe} --stage calibration" in result.err
    assert len(result.err.strip().splitlines()) == 1
