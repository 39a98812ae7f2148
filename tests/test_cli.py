"""The `hat` command line: every command documents itself, and errors are one line with a code."""

from __future__ import annotations

import pytest

COMMANDS = ["pack", "train", "eval", "calops", "export", "check", "compile", "perf", "infer", "run", "report", "plugins",
            "recipe", "march", "sensitivity", "debug"]


def test_root_help_lists_every_command(hat):
    result = hat("--help")
    assert result.code == 0
    for command in COMMANDS:
        assert command in result.out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(hat, command):
    args = ["recipe", "show", "--help"] if command == "recipe" else [command, "--help"]
    result = hat(*args)
    assert result.code == 0, result.err
    assert "Example" in result.out
    assert "hat " in result.out


@pytest.mark.parametrize("command", ["", *COMMANDS, "recipe validate", "pack verify"])
def test_flags_show_no_value_placeholder_in_help(hat, command):
    result = hat(*command.split(), "--help")
    assert result.code == 0, result.err
    assert "<bool>" not in result.out  # --json, --resume/--no-resume, --help take no value


def test_version(hat):
    result = hat("--version")
    assert result.code == 0 and result.out.startswith("hat ")


def test_unknown_option_is_a_usage_error(hat):
    assert hat("train", "--no-such-option").code == 2


def test_missing_recipe_file_exits_2_with_one_line(hat, tmp_path):
    result = hat("train", tmp_path / "nope.toml")
    assert result.code == 2
    assert "recipe file not found" in result.err
    assert "Traceback" not in result.err


def test_unknown_packer_names_the_available_ones(hat, tmp_path):
    result = hat("pack", "shapez", "--target-data-dir", tmp_path)
    assert result.code == 2
    assert "did you mean `shapes`" in result.err.lower()


def test_unknown_march_exits_2(hat, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not onnx")
    result = hat("check", "--model", model, "--march", "nash_x")
    assert result.code == 2
    assert "nash_e" in result.err


def test_list_marches(hat):
    result = hat("check", "--list-marches", "--json")
    assert result.code == 0
    assert [m["name"] for m in result.json()] == ["bayes", "bayes_e", "bernoulli2", "nash_e", "nash_m", "nash_p", "host"]


def test_one_march_shows_its_rules_and_op_limits(hat):
    profile = hat("check", "--list-marches", "--march", "nash_e", "--json").json()
    assert profile["int8_tops"] == 80 and profile["quant"]["float_output"] is False
    assert profile["quant"]["activation_dtypes"] == ["int8", "int16"]
    assert profile["ops"]["Conv"]["max_kernel"] == 9
    table = hat("check", "--list-marches", "--march", "bayes")
    assert table.code == 0 and "max kernel" in table.out and "Conv" in table.out
    assert hat("check", "--list-marches", "--march", "j5").code == 2


def test_runtime_failure_exits_1_and_names_what_to_do(hat, tiny_recipe):
    result = hat("eval", tiny_recipe, "--stage", "float")
    assert result.code == 1
    assert "no checkpoint" in result.err and "run that stage first" in result.err


def test_pack_shapes_then_verify(hat, tmp_path):
    result = hat("pack", "shapes", "--target-data-dir", tmp_path / "d", "--num-images", "20", "--image-size", "32",
                 "--json")
    assert result.code == 0, result.err
    assert sorted(result.json()["databases"].values()) == [4, 16]
    verify = hat("pack", "verify", tmp_path / "d" / "val_lmdb", "--json")
    assert verify.code == 0 and verify.json()["count"] == 4
