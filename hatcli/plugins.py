"""Plugin manager: entry-point discovery, registries, and broken-plugin reporting.

Plugins are found through the `hat.plugins` entry-point group. A plugin that raises anything
(`SystemExit` included; only Ctrl-C goes through) while it is imported or while its hooks run,
that implements a hook hat does not have (a misspelt `register_familys`), or that registers a
name another plugin holds, is recorded as broken with the reason; every other plugin and every
command keep working. Registration is all-or-nothing per plugin: what a plugin's hooks register
is staged and reaches the registries only once all its hooks have succeeded.
`HAT_LOAD_PLUGINS=a,b` loads only the named plugins (an empty value loads none but the built-in one).

The built-in plugin (`hatcli.builtin`, hat's own packers and callbacks) is a plugin like any other:
this module finds it by its name, `BUILTIN_MODULE`, and never imports it. Plugins sit at the top of
the import graph (they may use every layer of hat), while the plugin manager sits near the bottom
(recipe loading runs discovery); a static import here would make every layer depend on them all.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as metadata
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

import pluggy

from hatcli import __version__, hookspecs
from hatcli.errors import PluginError
from hatcli.family import CallbackSpec, FamilyConfig, ModelFamily, Packer, QuantSchemeSpec, TaskKind
from hatcli.march_profile import MarchProfile
from hatcli.registry import Registry, closest
from hatcli.runtime_spec import RuntimeSpec

ENTRY_POINT_GROUP = "hat.plugins"
BUILTIN = "builtin"
BUILTIN_MODULE = "hatcli.builtin"
"""The built-in plugin's module, imported by name (its `hat.plugins` entry point names it too)."""


@dataclass(frozen=True)
class _Hook:
    """What one `register_*` hook registers: the object type and the PluginState/PluginInfo field."""

    kind: type
    field: str


HOOKS: dict[str, _Hook] = {
    "register_families": _Hook(ModelFamily, "families"),
    "register_packers": _Hook(Packer, "packers"),
    "register_callbacks": _Hook(CallbackSpec, "callbacks"),
    "register_quant_schemes": _Hook(QuantSchemeSpec, "quant_schemes"),
    "register_marches": _Hook(MarchProfile, "marches"),
    "register_runtimes": _Hook(RuntimeSpec, "runtimes"),
}
"""Every hook of `hatcli.hookspecs`, in the order they are called for each plugin."""


@dataclass
class PluginInfo:
    """What `hat plugins` shows for one plugin."""

    name: str
    distribution: str
    version: str
    status: str = "ok"
    error: str = ""
    families: list[str] = field(default_factory=list)
    packers: list[str] = field(default_factory=list)
    callbacks: list[str] = field(default_factory=list)
    quant_schemes: list[str] = field(default_factory=list)
    marches: list[str] = field(default_factory=list)
    runtimes: list[str] = field(default_factory=list)


@dataclass
class PluginState:
    """The loaded plugin manager and the registries filled from it."""

    manager: pluggy.PluginManager
    infos: dict[str, PluginInfo]
    families: Registry[ModelFamily]
    packers: Registry[Packer]
    callbacks: Registry[CallbackSpec]
    quant_schemes: Registry[QuantSchemeSpec]
    marches: Registry[MarchProfile]
    runtimes: Registry[RuntimeSpec]


_state: PluginState | None = None


def _describe(exc: BaseException) -> str:
    """One line naming the exception and its first message line (`SystemExit: 7`); all of pluggy's
    validation message, whose later lines say which argument is wrong; hat's own checks unprefixed."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, PluginError):  # hat's own check: the message says it all
        return "; ".join(lines)
    if isinstance(exc, pluggy.PluginValidationError):
        return f"{type(exc).__name__}: {'; '.join(lines)}"
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _isolated(info: PluginInfo, action: Callable[[], Any]) -> bool:
    """Run `action` for plugin `info`; on any exception but Ctrl-C mark it broken and return False.

    BaseException, not Exception: a plugin that calls `sys.exit()` must not end hat. What the
    plugin prints goes to stderr.
    """
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for results (`--json`), not plugin chatter
            action()
        return True
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a broken plugin must never break hat
        info.status, info.error = "broken", _describe(exc)
        return False


def _selected(name: str) -> bool:
    wanted = os.environ.get("HAT_LOAD_PLUGINS")
    if wanted is None or name == BUILTIN:
        return True
    return name in {n.strip() for n in wanted.split(",") if n.strip()}


def _check_hooks(pm: pluggy.PluginManager, plugin: object) -> None:
    """Raise PluginError when `plugin` implements no hook, or one that hat has no spec for.

    pluggy accepts a hook implementation without a spec (its `check_pending` finds them, for all
    plugins at once); here the check is per plugin so that only the offender is broken.
    """
    callers = pm.get_hookcallers(plugin) or []
    for caller in callers:
        # `@hookimpl(optionalhook=True)` is pluggy's way to implement a hook a newer hat may have
        if caller.has_spec() or all(i.optionalhook for i in caller.get_hookimpls() if i.plugin is plugin):
            continue
        hint = closest(caller.name, sorted(HOOKS))
        did_you_mean = f" (did you mean `{hint}`?)" if hint else ""
        raise PluginError(f"unknown hook `{caller.name}`{did_you_mean}; hat's hooks are {', '.join(sorted(HOOKS))}")
    if not callers:
        raise PluginError(f"implements no hook; mark its {' / '.join(sorted(HOOKS))} functions with "
                          "`@hatcli.hookspecs.hookimpl`")


def _admit(pm: pluggy.PluginManager, info: PluginInfo, load: Callable[[], object]) -> None:
    """Import a plugin with `load`, register it with pluggy and check its hooks, or mark it broken."""
    def register() -> None:
        plugin = load()
        pm.register(plugin, name=info.name)
        try:
            _check_hooks(pm, plugin)
        except PluginError:
            pm.unregister(plugin)
            raise

    _isolated(info, register)


def _entry_point_infos(pm: pluggy.PluginManager, infos: dict[str, PluginInfo]) -> None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in infos or not _selected(ep.name):
            continue
        dist = ep.dist
        info = PluginInfo(name=ep.name, distribution=dist.metadata["Name"] if dist else "?",
                          version=dist.version if dist else "?")
        infos[ep.name] = info
        _admit(pm, info, ep.load)


def _check_family(family: ModelFamily) -> None:
    """Raise PluginError when `family` lacks what the core reads from every family."""
    where = f"model family `{family.name}` ({type(family).__module__}.{type(family).__name__})"
    if getattr(family, "task", None) not in get_args(TaskKind):
        raise PluginError(f"{where}: `task` must be one of {', '.join(get_args(TaskKind))}")
    config_class = family.config_class
    if not (isinstance(config_class, type) and issubclass(config_class, FamilyConfig)):
        raise PluginError(f"{where}: `config_class` must be a subclass of hatcli.family.FamilyConfig")
    names = family.output_names
    if not (isinstance(names, (list, tuple)) and names and all(isinstance(n, str) and n for n in names)):
        raise PluginError(f"{where}: `output_names` must be a non-empty list of names")


def _staged_registrations(state: PluginState, owner: str) -> list[tuple[_Hook, Any]]:
    """Call every hook of plugin `owner` and return what it registered, in order, unregistered yet.

    Raises whatever a hook raises, and PluginError for an object of the wrong type, without a
    name, or registered twice by this plugin.
    """
    pm = state.manager
    plugin = pm.get_plugin(owner)
    staged: list[tuple[_Hook, Any]] = []
    for hook_name, hook in HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin is not plugin:
                continue
            if impl.hookwrapper or impl.wrapper:
                raise PluginError(f"`{hook_name}` is a hook wrapper; hat calls its hooks plainly")

            def register(item: Any, _hook: _Hook = hook, _hook_name: str = hook_name) -> None:
                if not isinstance(item, _hook.kind):
                    raise PluginError(f"`{_hook_name}` was given a {type(item).__name__}; register a "
                                      f"{_hook.kind.__module__}.{_hook.kind.__name__}")
                name = getattr(item, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"`{_hook_name}` was given a {type(item).__name__} without a `name`")
                if isinstance(item, ModelFamily):
                    _check_family(item)
                if any(h is _hook and i.name == name for h, i in staged):
                    raise PluginError(f"{getattr(state, _hook.field).what} `{name}` is registered twice by {owner}")
                staged.append((_hook, item))

            impl.function(**{arg: register for arg in impl.argnames})
    return staged


def _register_plugin(state: PluginState, owner: str) -> None:
    """Stage everything plugin `owner` registers; commit it only if all its hooks succeeded and no
    name clashes. On failure the plugin is broken, registers nothing and leaves the manager."""
    info = state.infos[owner]
    staged: list[tuple[_Hook, Any]] = []

    def stage() -> None:
        staged.extend(_staged_registrations(state, owner))
        for hook, item in staged:
            getattr(state, hook.field).check_free(item.name, owner)

    if not _isolated(info, stage):
        state.manager.unregister(name=owner)
        return
    for hook, item in staged:
        getattr(state, hook.field).register(item.name, item, owner=owner)
        getattr(info, hook.field).append(item.name)


def load_plugins(reload: bool = False) -> PluginState:
    """Discover and register every plugin once per process; return the filled registries.

    Plugins register in a stable order, built-in first, then by name; when two register the same
    name, the later one is broken and the first keeps it.
    """
    global _state
    if _state is not None and not reload:
        return _state
    pm = pluggy.PluginManager("hat")
    pm.add_hookspecs(hookspecs)
    # outside `_admit`: hat's own plugin failing to import is a bug in hat, not a broken plugin
    builtin = importlib.import_module(BUILTIN_MODULE)

    infos = {BUILTIN: PluginInfo(name=BUILTIN, distribution="hatcli", version=__version__)}
    _admit(pm, infos[BUILTIN], lambda: builtin)
    _entry_point_infos(pm, infos)
    state = PluginState(manager=pm, infos=infos, families=Registry("model family"),
                        packers=Registry("packer"), callbacks=Registry("callback"),
                        quant_schemes=Registry("quantization scheme"),
                        marches=Registry("march"), runtimes=Registry("runtime"))
    for owner in sorted(infos, key=lambda name: (name != BUILTIN, name)):
        if infos[owner].status == "ok":
            _register_plugin(state, owner)
    broken = {name: info.error for name, info in infos.items() if info.status != "ok"}
    for hook in HOOKS.values():
        getattr(state, hook.field).broken = broken
    _state = state
    return _state


def families() -> Registry[ModelFamily]:
    """Return the registry of installed model families."""
    return load_plugins().families


def packers() -> Registry[Packer]:
    """Return the registry of installed dataset packers."""
    return load_plugins().packers


def callbacks() -> Registry[CallbackSpec]:
    """Return the registry of training callbacks that plugins provide."""
    return load_plugins().callbacks


def quant_schemes() -> Registry[QuantSchemeSpec]:
    """Return the registry of quantization-aware-training schemes (`[quant] scheme = ...`)."""
    return load_plugins().quant_schemes


def marches() -> Registry[MarchProfile]:
    """Return the registry of march profiles (`[quant] march = ...`, `--march`)."""
    return load_plugins().marches


def runtimes() -> Registry[RuntimeSpec]:
    """Return the registry of runtimes that run artifacts (`--runtime NAME`)."""
    return load_plugins().runtimes


def plugin_infos() -> list[PluginInfo]:
    """Return one PluginInfo per discovered plugin, built-in first."""
    infos = load_plugins().infos
    return [infos[BUILTIN]] + [infos[k] for k in sorted(infos) if k != BUILTIN]
