"""Entry point of the plugin: registers the `openvino` runtime (OpenVINO is imported only when a
model is loaded, so the runtime registers whether or not OpenVINO is installed)."""

from __future__ import annotations

from collections.abc import Callable

from hatcli.hookspecs import hookimpl
from hatcli.runtime_spec import RuntimeSpec


@hookimpl
def register_runtimes(register: Callable[[RuntimeSpec], None]) -> None:
    """Register the `openvino` runtime."""
    from hat_openvino.runtime import OPENVINO

    register(OPENVINO)
