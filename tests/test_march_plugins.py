"""Marches as plugins: hat's own profiles come through `register_marches` like a third party's; a
profile written from docs/marches.md alone is listed, checked against and compiled for; a profile
file works wherever a march name does; a bad profile is a clear error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from test_deploy import TinyCNN, export
from test_plugins import install, site  # noqa: F401  (`site`: the throwaway site-packages fixture)
from hatcli.errors import UsageError
from hatcli.march_profile import read_march_file
from hatcli.plugins import marches, plugin_infos
from hatcli.quant.march import SHIPPED_MARCHES, list_marches, load_march, march_names

DOC = (Path(__file__).parents[1] / "docs" / "marches.md").read_text()


def _block(language: str, needle: str) -> str:
    return next(b for b in re.findall(rf"```{language}\n(.*?)```", DOC, flags=re.S) if needle in b)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export(TinyCNN(), tmp_path_factory.mktemp("march") / "model.onnx")


def test_the_shipped_marches_are_registered_by_the_builtin_plugin():
    builtin = next(i for i in plugin_infos() if i.name == "builtin")
    assert builtin.marches == list(SHIPPED_MARCHES)
    assert march_names()[:len(SHIPPED_MARCHES)] == list(SHIPPED_MARCHES)
    assert {"bayes_e", "bernoulli2"} <= set(march_names())
    assert [m.name for m in list_marches()] == march_names()


def test_the_rdk_marches_carry_their_boards_rules():
    x3, x5 = load_march("bernoulli2"), load_march("bayes_e")
    assert not x3.quant.allow_int16 and x5.quant.allow_int16
    assert "SiLU" not in x3.fusible_activations  # SiLU is a table then a multiply on Bernoulli2
    assert x3.int8_tops < x5.int8_tops < load_march("nash_e").int8_tops
    assert all(m.estimated for m in (x3, x5))


def test_a_march_written_from_the_docs_is_listed_checked_and_compiled_for(hat, site, fresh_plugins,  # noqa: F811
                                                                       tiny_onnx, tmp_path):
    (site / "my_npu.toml").write_text(_block("toml", 'name = "my_npu"'))
    info = install(site, fresh_plugins, "hat_test_npu", _block("python", "register_marches"))
    assert info.status == "ok", info.error
    assert info.marches == ["my_npu"]
    assert marches().owner("my_npu") == "hat_test_npu"

    listed = hat("check", "--list-marches")
    assert listed.code == 0 and "my_npu" in listed.out
    assert any(m["name"] == "my_npu" for m in hat("march", "list", "--json").json())

    checked = hat("check", "--model", tiny_onnx, "--march", "my_npu", "--json")
    assert checked.json()["march"] == "my_npu"
    out = tmp_path / "my_npu-O3"
    compiled = hat("compile", "--model", tiny_onnx, "--march", "my_npu", "--out", out)
    assert compiled.code == 0, compiled.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["march"] == "my_npu"
    perf = hat("perf", out, "--no-measure", "--json")
    assert perf.code == 0, perf.err
    assert perf.json()["estimate"]["chip"] == "My NPU (4 TOPS)"


def test_a_profile_that_does_not_validate_breaks_its_plugin_naming_the_file_and_key(site, fresh_plugins):  # noqa: F811
    (site / "bad_npu.toml").write_text('name = "bad_npu"\nchip = "x"\nint8_tops = 4\nturbo = true\n'
                                       '[cost]\nddr_gbytes_per_s = 1\n')
    info = install(site, fresh_plugins, "hat_test_badnpu", _block("python", "register_marches")
                   .replace("my_npu.toml", "bad_npu.toml"))
    assert info.status == "broken"
    assert "bad_npu.toml" in info.error and "`turbo`" in info.error
    assert "bad_npu" not in marches()


def test_a_plugin_cannot_take_a_shipped_march_name(site, fresh_plugins):  # noqa: F811
    (site / "nash.toml").write_text(_block("toml", 'name = "my_npu"').replace('"my_npu"', '"nash_e"'))
    info = install(site, fresh_plugins, "hat_test_nash", _block("python", "register_marches")
                   .replace("my_npu.toml", "nash.toml"))
    assert info.status == "broken" and "registered twice" in info.error
    assert load_march("nash_e").chip == "Journey 6E"


def test_a_profile_file_works_wherever_a_march_name_does(hat, tmp_path, tiny_onnx, tiny_recipe):
    profile = tmp_path / "board.toml"
    profile.write_text(_block("toml", 'name = "my_npu"'))
    assert load_march(str(profile)).name == "my_npu"
    checked = hat("check", "--model", tiny_onnx, "--march", profile, "--json")
    assert checked.json()["march"] == "my_npu"
    validated = hat("recipe", "validate", tiny_recipe, "--set", f"quant.march={profile}")
    assert validated.code == 0, validated.err


def test_an_artifact_keeps_the_profile_it_was_compiled_for(hat, tmp_path, tiny_onnx):
    profile = tmp_path / "board.toml"
    profile.write_text(_block("toml", 'name = "my_npu"'))
    artifact = tmp_path / "art"
    compiled = hat("compile", "--model", tiny_onnx, "--march", profile, "--out", artifact)
    assert compiled.code == 0, compiled.err
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["march_profile"] == "march.toml" and "march.toml" in manifest["files"]
    assert read_march_file(artifact / "march.toml") == load_march(str(profile))
    profile.unlink()  # `my_npu` is no longer anywhere but in the artifact
    perf = hat("perf", artifact, "--no-measure", "--json")
    assert perf.code == 0, perf.err
    assert perf.json()["estimate"]["march"] == "my_npu"
    assert "`my_npu` is not installed here" in perf.err and "march.toml" in perf.err


def test_a_bad_march_is_a_one_line_usage_error(hat, tmp_path, tiny_onnx, tiny_recipe):
    with pytest.raises(UsageError, match=r"unknown march `nash_x`\. Did you mean `nash_[emp]`\? Available: bayes, bayes_e"):
        load_march("nash_x")
    missing = hat("check", "--model", tiny_onnx, "--march", tmp_path / "nope.toml")
    assert missing.code == 2 and "nope.toml: cannot read the march profile" in missing.err
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "b"\nchip = "c"\nint8_tops = -1\n[cost]\nddr_gbytes_per_s = 1\n')
    with pytest.raises(UsageError, match=r"broken\.toml: march profile key `int8_tops`"):
        read_march_file(broken)
    recipe = hat("recipe", "validate", tiny_recipe, "--set", f"quant.march={broken}")
    assert recipe.code == 2 and "`quant.march`" in recipe.err and "int8_tops" in recipe.err
