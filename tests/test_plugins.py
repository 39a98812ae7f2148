"""Plugins: discovery through entry points, broken plugins, duplicates, and the hook specs."""

from __future__ import annotations

import inspect
import sys
import textwrap

import pytest

from hatcli import hookspecs
from hatcli.errors import PluginError, UsageError
from hatcli.plugins import families, load_plugins, plugin_infos
from hatcli.registry import Registry


def make_distribution(root, dist_name, module_name, source, entry_name=None):
    """Install a throwaway plugin distribution into `root` (a folder then put on sys.path)."""
    (root / f"{module_name}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist_name}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[hat.plugins]\n{entry_name or module_name} = {module_name}\n")


@pytest.fixture
def site(fresh_plugins, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("hat_test_")]:
        del sys.modules[name]


def install(site, fresh_plugins, module_name, source):
    """Install `source` as plugin `module_name` (distribution hat-test-...), reload, return its PluginInfo."""
    make_distribution(site, module_name.replace("_", "-"), module_name, source)
    fresh_plugins()
    return {i.name: i for i in plugin_infos()}[module_name]


def test_installed_plugins_are_listed_with_version_and_families(hat):
    result = hat("plugins", "--json")
    assert result.code == 0
    by_name = {p["name"]: p for p in result.json()}
    assert by_name["builtin"]["packers"] == ["shapes", "imagenet", "coco", "voc", "cityscapes", "mnist"]
    assert by_name["unet"]["families"] == ["unet"]
    assert by_name["mobilenet"]["families"] == ["mobilenet_v1", "mobilenet_v2"]
    assert by_name["mobilenet"]["distribution"] == "hat-mobilenet"
    assert by_name["mobilenet"]["status"] == "ok"


def test_plugin_that_raises_on_import_is_broken_and_others_keep_working(hat, site, fresh_plugins, tiny_recipe):
    make_distribution(site, "hat-test-broken", "hat_test_broken", "raise RuntimeError('boom at import')\n")
    fresh_plugins()
    infos = {i.name: i for i in plugin_infos()}
    assert infos["hat_test_broken"].status == "broken"
    assert "RuntimeError: boom at import" in infos["hat_test_broken"].error
    assert infos["mobilenet"].status == "ok"
    listing = hat("plugins")
    assert listing.code == 0 and "broken" in listing.out and "boom at import" in listing.out
    assert hat("recipe", "validate", tiny_recipe).code == 0  # commands still work


def test_plugin_that_fails_while_registering_is_broken(site, fresh_plugins):
    make_distribution(site, "hat-test-badreg", "hat_test_badreg", """
        from hatcli.hookspecs import hookimpl

        @hookimpl
        def register_families(register):
            raise ValueError("cannot build")
    """)
    fresh_plugins()
    info = {i.name: i for i in plugin_infos()}["hat_test_badreg"]
    assert info.status == "broken" and "cannot build" in info.error


def test_third_party_family_registers_and_is_usable(site, fresh_plugins, tiny_recipe):
    make_distribution(site, "hat-test-tinynet", "hat_test_tinynet", """
        from typing import ClassVar
        import torch
        from hatcli.hookspecs import hookimpl
        from hatcli.tasks.classification import ClassificationFamily

        class TinyNet(ClassificationFamily):
            name: ClassVar[str] = "tinynet"

            def build_float_model(self, config, num_classes):
                return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                           torch.nn.Linear(8, num_classes))

        @hookimpl
        def register_families(register):
            register(TinyNet())
    """)
    fresh_plugins()
    assert "tinynet" in families()
    from hatcli.recipe import load_recipe

    lr = load_recipe(tiny_recipe, ["model={name=\"tinynet\"}"])
    assert lr.family.name == "tinynet"
    assert lr.family.build_float_model(lr.model, 6)(__import__("torch").zeros(1, 3, 32, 32)).shape == (1, 6)


def test_registering_a_family_twice_is_an_error(site, fresh_plugins):
    make_distribution(site, "hat-test-dup", "hat_test_dup", """
        from hatcli.hookspecs import hookimpl
        from hat_mobilenet.family import MobileNetV1Family

        @hookimpl
        def register_families(register):
            register(MobileNetV1Family())
    """)
    fresh_plugins()
    infos = {i.name: i for i in plugin_infos()}
    broken = [infos[n] for n in ("hat_test_dup", "mobilenet") if infos[n].status == "broken"]
    assert len(broken) == 1
    assert "`mobilenet_v1` is registered twice: by hat_test_dup and by mobilenet" in broken[0].error
    assert families().owner("mobilenet_v1") in ("hat_test_dup", "mobilenet")


def test_hat_load_plugins_limits_what_loads(fresh_plugins, monkeypatch):
    monkeypatch.setenv("HAT_LOAD_PLUGINS", "")
    fresh_plugins()
    assert [i.name for i in plugin_infos()] == ["builtin"]
    assert "mobilenet_v1" not in families()


def test_registry_rejects_duplicates_and_lists_names_on_unknown():
    registry: Registry[int] = Registry("widget")
    registry.register("alpha", 1)
    with pytest.raises(PluginError, match="registered twice"):
        registry.register("alpha", 2)
    with pytest.raises(Exception, match="Available: alpha"):
        registry.get("beta")


HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]


def test_there_are_hooks():
    assert HOOKS == ["register_callbacks", "register_families", "register_marches", "register_packers",
                     "register_quant_schemes", "register_runtimes"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert doc and "register(" in doc


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_exercised_by_an_installed_plugin(hook):
    implementations = getattr(load_plugins().manager.hook, hook).get_hookimpls()
    assert implementations, f"no plugin implements {hook}"


# --- isolation: nothing a plugin raises (but Ctrl-C) escapes into hat ---------------------------

def test_plugin_that_raises_system_exit_at_import_is_broken_and_every_command_works(hat, site, fresh_plugins,
                                                                                     tiny_recipe):
    make_distribution(site, "hat-test-exit", "hat_test_exit", "raise SystemExit(7)\n")
    fresh_plugins()
    listing = hat("plugins")
    assert listing.code == 0
    assert "hat_test_exit" in listing.out and "SystemExit: 7" in listing.out
    assert hat("recipe", "validate", tiny_recipe).code == 0


def test_plugin_whose_hook_raises_system_exit_is_broken_and_the_others_load(site, fresh_plugins):
    make_distribution(site, "hat-test-hookexit", "hat_test_hookexit", """
        import sys
        from hatcli.hookspecs import hookimpl

        @hookimpl
        def register_packers(register):
            sys.exit("leaving from a hook")
    """)
    fresh_plugins()
    infos = {i.name: i for i in plugin_infos()}
    assert infos["hat_test_hookexit"].status == "broken"
    assert "SystemExit: leaving from a hook" in infos["hat_test_hookexit"].error
    assert infos["mobilenet"].status == "ok" and "mobilenet_v1" in families()


def test_ctrl_c_while_a_plugin_imports_is_not_swallowed(site, fresh_plugins):
    make_distribution(site, "hat-test-ctrlc", "hat_test_ctrlc", "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        fresh_plugins()


def test_plugins_json_shows_broken_plugins_with_their_errors(hat, site, fresh_plugins):
    make_distribution(site, "hat-test-exitjson", "hat_test_exitjson", "raise SystemExit(7)\n")
    fresh_plugins()
    result = hat("plugins", "--json")
    assert result.code == 0
    by_name = {p["name"]: p for p in result.json()}
    assert by_name["hat_test_exitjson"]["status"] == "broken"
    assert by_name["hat_test_exitjson"]["error"] == "SystemExit: 7"
    assert by_name["hat_test_exitjson"]["distribution"] == "hat-test-exitjson"
    assert by_name["mobilenet"]["status"] == "ok"


# --- validation: a plugin that registers nothing useful says why ---------------------------------

def test_misspelt_hook_is_broken_and_names_the_closest_hook(site, fresh_plugins):
    make_distribution(site, "hat-test-typo", "hat_test_typo", """
        from hatcli.hookspecs import hookimpl

        @hookimpl
        def register_familys(register):
            pass
    """)
    fresh_plugins()
    infos = {i.name: i for i in plugin_infos()}
    assert infos["hat_test_typo"].status == "broken"
    assert "register_familys" in infos["hat_test_typo"].error
    assert "did you mean `register_families`" in infos["hat_test_typo"].error
    assert all(i.status == "ok" for n, i in infos.items() if n != "hat_test_typo")


TINY_FAMILY = """
    from typing import ClassVar
    import torch
    from hatcli.family import Packer, PackResult
    from hatcli.hookspecs import hookimpl
    from hatcli.tasks.classification import ClassificationFamily

    class Half(ClassificationFamily):
        name: ClassVar[str] = "halfnet"

        def build_float_model(self, config, num_classes):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))
"""

HALF_PLUGIN = TINY_FAMILY + """
    @hookimpl
    def register_families(register):
        register(Half())
"""


def test_plugin_that_fails_in_one_hook_registers_nothing_from_its_other_hooks(site, fresh_plugins):
    info = install(site, fresh_plugins, "hat_test_half", HALF_PLUGIN + """
    @hookimpl
    def register_callbacks(register):
        raise RuntimeError("callbacks not ready")
    """)
    assert info.status == "broken" and "callbacks not ready" in info.error
    assert "halfnet" not in families()
    assert info.families == []


def test_plugin_that_fails_halfway_through_one_hook_registers_nothing(site, fresh_plugins):
    info = install(site, fresh_plugins, "hat_test_halfway", TINY_FAMILY + """
    @hookimpl
    def register_families(register):
        register(Half())  # staged, then the hook fails: it must not stay registered
        raise RuntimeError("second family failed")
    """)
    assert info.status == "broken" and "second family failed" in info.error
    assert "halfnet" not in families()


def test_plugin_whose_name_clashes_registers_none_of_its_other_items(site, fresh_plugins):
    info = install(site, fresh_plugins, "hat_test_clash", HALF_PLUGIN + """
    @hookimpl
    def register_packers(register):
        register(Packer(name="shapes", description="a second shapes", run=lambda request: PackResult()))
    """)
    assert info.status == "broken"
    assert "packer `shapes` is registered twice: by builtin and by hat_test_clash" in info.error
    assert "halfnet" not in families()
    from hatcli.plugins import packers

    assert packers().owner("shapes") == "builtin"


def test_plugin_that_registers_the_wrong_kind_of_object_is_broken(site, fresh_plugins):
    info = install(site, fresh_plugins, "hat_test_wrongkind", """
        from hatcli.hookspecs import hookimpl

        @hookimpl
        def register_families(register):
            register("mobilenet_v2")
    """)
    assert info.status == "broken"
    assert "register_families" in info.error and "ModelFamily" in info.error and "str" in info.error


# --- the base classes declare what the core reads -------------------------------------------------

def test_base_classes_declare_output_names_and_num_classes():
    from hatcli.family import FamilyConfig, ModelFamily

    assert ModelFamily.output_names == ["output"]
    assert "num_classes" in FamilyConfig.model_fields
    assert FamilyConfig(name="anything").num_classes is None


def test_core_reads_family_members_as_plain_attributes_not_with_getattr():
    from pathlib import Path

    import hatcli

    offenders = []
    for path in Path(hatcli.__file__).parent.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "getattr(" in line and ('"output_names"' in line or '"num_classes"' in line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


# --- `hat plugins` never cuts a name ---------------------------------------------------------------

def _every_listed_name():
    names = set()
    for info in plugin_infos():
        names |= {info.name, info.distribution, *info.families, *info.packers, *info.callbacks}
    return names


def test_plugins_listing_off_a_terminal_never_truncates_names():
    import os
    import subprocess

    env = dict(os.environ, COLUMNS="60")
    run = subprocess.run([sys.executable, "-m", "hatcli", "plugins"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "…" not in run.stdout
    words = set(run.stdout.replace(",", " ").split())
    assert _every_listed_name() <= words


@pytest.mark.parametrize("width", [60, 200])
def test_plugins_table_on_a_terminal_never_truncates_names(monkeypatch, width):
    import io

    from rich.console import Console

    from hatcli.commands import plugins as command

    buffer = io.StringIO()
    monkeypatch.setattr(command, "stdout", Console(file=buffer, width=width, force_terminal=True, color_system=None))
    command.plugins()
    text = buffer.getvalue()
    assert "…" not in text
    words = set(text.replace(",", " ").replace("│", " ").replace("┃", " ").split())
    assert _every_listed_name() <= words


def test_family_whose_config_class_is_not_a_family_config_is_broken(site, fresh_plugins):
    info = install(site, fresh_plugins, "hat_test_badconfig", TINY_FAMILY + """
    from pydantic import BaseModel

    class Loose(BaseModel):
        name: str

    class LooseHalf(Half):
        config_class = Loose

    @hookimpl
    def register_families(register):
        register(LooseHalf())
    """)
    assert info.status == "broken"
    assert "model family `halfnet`" in info.error and "hatcli.family.FamilyConfig" in info.error
    assert "halfnet" not in families()


def test_plugin_without_any_hookimpl_is_broken_and_says_to_mark_its_hooks(site, fresh_plugins):
    info = install(site, fresh_plugins, "hat_test_unmarked", """
        def register_families(register):
            pass
    """)
    assert info.status == "broken" and "implements no hook" in info.error and "@hatcli.hookspecs.hookimpl" in info.error


def test_optional_implementation_of_a_hook_hat_does_not_have_yet_is_fine(site, fresh_plugins):
    info = install(site, fresh_plugins, "hat_test_future", HALF_PLUGIN + """
    @hookimpl(optionalhook=True)
    def register_marches(register):
        pass
    """)
    assert info.status == "ok" and info.families == ["halfnet"]


def test_unknown_name_error_points_at_broken_plugins(site, fresh_plugins):
    install(site, fresh_plugins, "hat_test_gone", "raise SystemExit(7)\n")
    with pytest.raises(UsageError, match=r"unknown model family `gonenet`.*Broken plugins, which may provide it: "
                                         r"hat_test_gone \(`hat plugins` says why\)"):
        families().get("gonenet")


def test_what_a_plugin_prints_while_loading_stays_off_stdout(hat, site, fresh_plugins, monkeypatch):
    info = install(site, fresh_plugins, "hat_test_chatty", TINY_FAMILY + """
    @hookimpl
    def register_families(register):
        print("hello from a hook")
        register(Half())
    """)
    assert info.status == "ok"
    import hatcli.plugins

    monkeypatch.setattr(hatcli.plugins, "_state", None)  # load inside the command, as `hat` does
    result = hat("plugins", "--json")
    assert result.code == 0 and "hello from a hook" not in result.out and "hello from a hook" in result.err
    assert "hat_test_chatty" in {p["name"] for p in result.json()}


def test_hook_with_an_argument_the_spec_lacks_is_broken_and_names_the_argument(site, fresh_plugins):
    info = install(site, fresh_plugins, "hat_test_badarg", """
        from hatcli.hookspecs import hookimpl

        @hookimpl
        def register_families(regster):
            pass
    """)
    assert info.status == "broken"
    assert "PluginValidationError" in info.error and "regster" in info.error and "hookspec" in info.error
