"""The built-in plugin: what hat provides itself, registered through the same hooks as others."""

from __future__ import annotations

from collections.abc import Callable

from hatcli.family import Packer, PackRequest, PackResult
from hatcli.hookspecs import hookimpl


def _pack_shapes(request: PackRequest) -> PackResult:
    from hatcli.data.shapes import pack_shapes

    return pack_shapes(request)


@hookimpl
def register_packers(register: Callable[[Packer], None]) -> None:
    """Register the packers that ship with hat."""
    register(
        Packer(
            name="shapes",
            description="generate a deterministic synthetic dataset (coloured shapes) and pack it",
            run=_pack_shapes,
        )
    )
