"""Entry point of the plugin: registers `fcos_efficientnet_b0` (torch is imported lazily)."""

from __future__ import annotations

from collections.abc import Callable

from hatcli.family import ModelFamily
from hatcli.hookspecs import hookimpl


@hookimpl
def register_families(register: Callable[[ModelFamily], None]) -> None:
    """Register the FCOS-EfficientNet-B0 detection family."""
    from hat_fcos_efficientnet.family import FcosEfficientNetFamily

    register(FcosEfficientNetFamily())
