"""Plugin manager: entry-point discovery, registries, and broken-plugin reporting.

Plugins are found through the `hat.plugins` entry-point group. A plugin that raises while it is
imported, or while it registers, is recorded as broken with the reason; every other plugin and
every command keep working. `HAT_LOAD_PLUGINS=a,b` loads only the named plugins (an empty value
loads none but the built-in one).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from hatcli import hookspecs
from hatcli.family import CallbackSpec, ModelFamily, Packer
from hatcli.registry import Registry

ENTRY_POINT_GROUP = "hat.plugins"
BUILTIN = "builtin"


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


@dataclass
class PluginState:
    """The loaded plugin manager and the registries filled from it."""

    manager: pluggy.PluginManager
    infos: dict[str, PluginInfo]
    families: Registry[ModelFamily]
    packers: Registry[Packer]
    callbacks: Registry[CallbackSpec]


_state: PluginState | None = None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _selected(name: str) -> bool:
    wanted = os.environ.get("HAT_LOAD_PLUGINS")
    if wanted is None or name == BUILTIN:
        return True
    return name in {n.strip() for n in wanted.split(",") if n.strip()}


def _load_entry_points(pm: pluggy.PluginManager, infos: dict[str, PluginInfo]) -> None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in infos or not _selected(ep.name):
            continue
        dist = ep.dist
        info = PluginInfo(
            name=ep.name,
            distribution=dist.metadata["Name"] if dist else "?",
            version=dist.version if dist else "?",
        )
        infos[ep.name] = info
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must never break hat
            info.status, info.error = "broken", _describe(exc)


def _call_register_hook(
    pm: pluggy.PluginManager,
    hook_name: str,
    registry: Registry[Any],
    infos: dict[str, PluginInfo],
    listing: Callable[[PluginInfo], list[str]],
) -> None:
    """Call one `register_*` hook plugin by plugin, so each item is attributed to its owner.

    Plugins are called in a stable order (built-in first, then by name); when two register the
    same name, the later one is reported broken and the first keeps it.
    """
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    for impl in sorted(impls, key=lambda i: (i.plugin_name != BUILTIN, i.plugin_name)):
        owner = impl.plugin_name
        info = infos[owner]
        if info.status == "broken":
            continue

        def register(item: Any, _owner: str = owner) -> None:
            registry.register(item.name, item, owner=_owner)
            listing(infos[_owner]).append(item.name)

        try:
            impl.function(**{arg: register for arg in impl.argnames})
        except Exception as exc:
            info.status, info.error = "broken", _describe(exc)


def load_plugins(reload: bool = False) -> PluginState:
    """Discover and register every plugin once per process; return the filled registries."""
    global _state
    if _state is not None and not reload:
        return _state
    pm = pluggy.PluginManager("hat")
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}

    from hatcli import builtin

    pm.register(builtin, name=BUILTIN)
    from hatcli import __version__

    infos[BUILTIN] = PluginInfo(name=BUILTIN, distribution="hatcli", version=__version__)
    _load_entry_points(pm, infos)

    families: Registry[ModelFamily] = Registry("model family")
    packers: Registry[Packer] = Registry("packer")
    _call_register_hook(pm, "register_families", families, infos, lambda i: i.families)
    _call_register_hook(pm, "register_packers", packers, infos, lambda i: i.packers)
    callbacks: Registry[CallbackSpec] = Registry("callback")
    _call_register_hook(pm, "register_callbacks", callbacks, infos, lambda i: i.callbacks)
    _state = PluginState(manager=pm, infos=infos, families=families, packers=packers, callbacks=callbacks)
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


def plugin_infos() -> list[PluginInfo]:
    """Return one PluginInfo per discovered plugin, built-in first."""
    infos = load_plugins().infos
    return [infos[BUILTIN]] + [infos[k] for k in sorted(infos) if k != BUILTIN]
