"""Entry point of the plugin: registers `mobilenet_v1` and `mobilenet_v2` (torch is imported lazily)."""

from __future__ import annotations

from collections.abc import Callable

from hatcli.family import ModelFamily
from hatcli.hookspecs import hookimpl


@hookimpl
def register_families(register: Callable[[ModelFamily], None]) -> None:
    """Register MobileNetV1 and MobileNetV2."""
    from hat_mobilenet.family import MobileNetV1Family, MobileNetV2Family

    register(MobileNetV1Family())
    register(MobileNetV2Family())
