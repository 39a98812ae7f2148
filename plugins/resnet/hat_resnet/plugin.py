"""Entry point of the plugin: registers the `resnet` family (torch is imported lazily)."""

from __future__ import annotations

from collections.abc import Callable

from hatcli.family import ModelFamily
from hatcli.hookspecs import hookimpl


@hookimpl
def register_families(register: Callable[[ModelFamily], None]) -> None:
    """Register ResNet."""
    from hat_resnet.family import ResNetFamily

    register(ResNetFamily())
