"""Name -> object registries for families, packers, transforms and metrics.

Keys are plain names (`mobilenet_v1`, `shapes`). Registering a name twice is an error, and an
unknown name gives a message that lists what exists and the closest match. Nothing here turns an
arbitrary string into an importable object.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from hatcli.errors import PluginError, UsageError

T = TypeVar("T")


def closest(name: str, choices: list[str]) -> str | None:
    """Return the valid choice closest to `name`, or None when nothing is close."""
    found = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return found[0] if found else None


class Registry(Generic[T]):
    """A mapping from plain names to registered objects of one kind (`what`)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}
        self.broken: dict[str, str] = {}
        """Plugins that failed to load, with the reason: an unknown name's error names them."""

    def check_free(self, name: str, owner: str = "hatcli") -> None:
        """Raise PluginError when `name` is taken; `owner` names the plugin that wants it."""
        if name in self._items:
            raise PluginError(
                f"{self.what} `{name}` is registered twice: by {self._owners[name]} and by {owner}"
            )

    def register(self, name: str, item: T, owner: str = "hatcli") -> None:
        """Add `item` under `name`; `owner` names the plugin, for the duplicate error."""
        self.check_free(name, owner)
        self._items[name] = item
        self._owners[name] = owner

    def unregister(self, name: str) -> None:
        """Remove `name` (used by tests that register a throwaway item)."""
        self._items.pop(name, None)
        self._owners.pop(name, None)

    def get(self, name: str, order: list[str] | None = None) -> T:
        """Return the item named `name`, or raise a UsageError listing what exists (in `order`
        when given, else sorted)."""
        try:
            return self._items[name]
        except KeyError:
            names = order if order is not None else sorted(self._items)
            hint = closest(name, names)
            did_you_mean = f" Did you mean `{hint}`?" if hint else ""
            listing = ", ".join(names) if names else "none installed"
            broken = ", ".join(sorted(self.broken))
            maybe = f". Broken plugins, which may provide it: {broken} (`hat plugins` says why)" if broken else ""
            raise UsageError(
                f"unknown {self.what} `{name}`.{did_you_mean} Available: {listing}{maybe}"
            ) from None

    def owner(self, name: str) -> str:
        """Return the plugin that registered `name`."""
        return self._owners[name]

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
