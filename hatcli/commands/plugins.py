"""`hat plugins`: installed plugin distributions, what they register, and whether they work.

Names are never cut: on a terminal wide enough for the table's narrowest layout it is a rich
table whose name columns do not wrap; anywhere else (a narrow terminal, a pipe, a log file) it
is plain aligned lines, as wide as the names need.
"""

from __future__ import annotations

from dataclasses import asdict

import typer
from rich.markup import escape
from rich.table import Table

from hatcli.commands._options import JsonOpt, aligned_lines, print_json
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat plugins

  HAT_LOAD_PLUGINS=mobilenet hat plugins --json
"""

HEADERS = ("plugin", "distribution", "version", "families", "packers", "callbacks", "schemes", "marches",
           "runtimes", "status")
LISTS = {"families", "packers", "callbacks", "schemes", "marches", "runtimes"}
"""Columns that hold comma-separated names: they may wrap between names, never inside one."""


def _rows(infos: list) -> list[tuple[str, ...]]:
    """One row of plain strings per plugin, in HEADERS order."""
    return [(i.name, i.distribution, i.version, ", ".join(i.families) or "-", ", ".join(i.packers) or "-",
             ", ".join(i.callbacks) or "-", ", ".join(i.quant_schemes) or "-",
             ", ".join(i.marches) or "-", ", ".join(i.runtimes) or "-", i.status) for i in infos]


def _column_widths(rows: list[tuple[str, ...]], available: int) -> list[int] | None:
    """Column widths for a table no wider than `available` that cuts no name, or None if none fits.

    A name column is as wide as its longest cell; a list column at least as wide as its longest
    single name, and it gets what room is left, up to its longest cell, left to right.
    """
    columns = list(zip(HEADERS, *rows))
    natural = [max(len(cell) for cell in column) for column in columns]
    minimum = [max(len(word) for cell in column for word in cell.split()) if column[0] in LISTS else width
               for column, width in zip(columns, natural)]
    room = available - (3 * len(HEADERS) + 1) - sum(minimum)  # padding of 1 each side, and the borders
    if room < 0:
        return None
    widths = list(minimum)
    for index, header in enumerate(HEADERS):
        if header in LISTS:
            grow = min(room, natural[index] - minimum[index])
            widths[index] += grow
            room -= grow
    return widths


def _table(rows: list[tuple[str, ...]], widths: list[int]) -> Table:
    """The rich table with fixed column widths: list columns wrap between names, never inside one."""
    table = Table()
    for header, width in zip(HEADERS, widths):
        table.add_column(header, width=width, no_wrap=header not in LISTS)
    for row in rows:
        status = "[green]ok[/]" if row[-1] == "ok" else "[red]broken[/]"
        table.add_row(*(escape(cell) for cell in row[:-1]), status)
    return table


def _print_family_descriptions() -> None:
    """One line per registered family: its name and its `description`, aligned."""
    from hatcli.plugins import families

    registry = families()
    if not registry.names():
        return
    width = max(len(name) for name in registry.names())
    stdout.print("\nfamilies:", markup=False, highlight=False)
    for name in registry.names():
        line = f"  {name.ljust(width)}  {registry.get(name).description or '-'}"
        stdout.print(line.rstrip(), markup=False, highlight=False, soft_wrap=True)


def plugins(json_out: JsonOpt = False) -> None:
    """List plugins with version, registered families, packers, callbacks, quantization schemes, marches and runtimes, and status (broken ones say why);
    then each family with its description."""
    from hatcli.plugins import plugin_infos

    infos = plugin_infos()
    if json_out:
        print_json([asdict(i) for i in infos])
        return
    rows = _rows(infos)
    widths = _column_widths(rows, stdout.width) if stdout.is_terminal else None
    if widths is not None:
        stdout.print(_table(rows, widths))
    else:
        for line in aligned_lines(HEADERS, rows):
            stdout.print(line, markup=False, highlight=False, soft_wrap=True)
    for info in infos:
        if info.status != "ok":
            stdout.print(f"[red]broken[/] plugin {escape(info.name)} ({escape(info.distribution)}): "
                         f"{escape(info.error)}", soft_wrap=True)
    _print_family_descriptions()


def register(app: typer.Typer) -> None:
    """Add `hat plugins` to the root app."""
    app.command("plugins", epilog=EXAMPLES)(plugins)
