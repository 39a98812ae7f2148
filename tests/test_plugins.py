"""Plugins: discovery through entry points, broken plugins, duplicates, and the hook specs."""

from __future__ import annotations

import inspect
import sys
import textwrap

import pytest

from hatcli import hookspecs
from hatcli.errors import PluginError
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


def test_installed_plugins_are_listed_with_version_and_families(hat):
    result = hat("plugins", "--json")
    assert result.code == 0
    by_name = {p["name"]: p for p in result.json()}
    assert by_name["builtin"]["packers"] == ["shapes", "imagenet", "coco", "mnist"]
    assert by_name["mobilenet"]["families"] == ["mobilenet_v1"]
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
    assert HOOKS == ["register_callbacks", "register_families", "register_packers"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert doc and "register(" in doc


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_exercised_by_an_installed_plugin(hook):
    implementations = getattr(load_plugins().manager.hook, hook).get_hookimpls()
    assert implementations, f"no plugin implements {hook}"
