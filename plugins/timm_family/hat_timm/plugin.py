"""Entry point of the plugin: registers the `timm` family (torch and timm are imported lazily, so
the family registers whether or not timm is installed)."""

from __future__ import annotations

from collections.abc import Callable

from hatcli.family import ModelFamily
from hatcli.hookspecs import hookimpl


@hookimpl
def register_families(register: Callable[[ModelFamily], None]) -> None:
    """Register the `timm` family."""
    from hat_timm.family import TimmFamily

    register(TimmFamily())
