"""`hat plugins`: installed plugin distributions, what they register, and whether they work."""

from __future__ import annotations

from dataclasses import asdict

import typer
from rich.markup import escape
from rich.table import Table

from hatcli.commands._options import JsonOpt, print_json
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat plugins

  HAT_LOAD_PLUGINS=mobilenet hat plugins --json
"""


def plugins(json_out: JsonOpt = False) -> None:
    """List plugins with version, registered families, packers and callbacks, and status (broken ones say why)."""
    from hatcli.plugins import plugin_infos

    infos = plugin_infos()
    if json_out:
        print_json([asdict(i) for i in infos])
        return
    table = Table("plugin", "distribution", "version", "families", "packers", "callbacks", "status")
    for info in infos:
        status = "[green]ok[/]" if info.status == "ok" else "[red]broken[/]"
        table.add_row(info.name, info.distribution, info.version, ", ".join(info.families) or "-",
                      ", ".join(info.packers) or "-", ", ".join(info.callbacks) or "-", status)
    stdout.print(table)
    for info in infos:
        if info.status != "ok":
            stdout.print(f"[red]broken[/] plugin {info.name} ({info.distribution}): {escape(info.error)}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `hat plugins` to the root app."""
    app.command("plugins", epilog=EXAMPLES)(plugins)
