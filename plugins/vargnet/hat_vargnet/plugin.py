"""Entry point of the plugin: registers the `vargnet_v2` family (torch is imported lazily)."""

from __future__ import annotations

from collections.abc import Callable

from hatcli.family import ModelFamily
from hatcli.hookspecs import hookimpl


@hookimpl
def register_families(register: Callable[[ModelFamily], None]) -> None:
    """Register VargNetV2."""
    from hat_vargnet.family import VargNetV2Family

    register(VargNetV2Family())
