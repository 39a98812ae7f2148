"""Entry point of the plugin: registers the `unet` family (torch is imported lazily)."""

from __future__ import annotations

from collections.abc import Callable

from hatcli.family import ModelFamily
from hatcli.hookspecs import hookimpl


@hookimpl
def register_families(register: Callable[[ModelFamily], None]) -> None:
    """Register UNet."""
    from hat_unet.family import UNetFamily

    register(UNetFamily())
