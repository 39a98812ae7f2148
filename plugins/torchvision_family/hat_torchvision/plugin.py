"""Entry point of the plugin: registers the `torchvision` family (torch and torchvision are imported lazily)."""

from __future__ import annotations

from collections.abc import Callable

from hatcli.family import ModelFamily
from hatcli.hookspecs import hookimpl


@hookimpl
def register_families(register: Callable[[ModelFamily], None]) -> None:
    """Register the `torchvision` family."""
    from hat_torchvision.family import TorchvisionFamily

    register(TorchvisionFamily())
