"""Options shared by several commands, and small output helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from hatcli.progress import stdout

RecipeArg = Annotated[Path, typer.Argument(help="Recipe TOML file.", metavar="RECIPE")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key, e.g. --set float.epochs=3 (repeatable).",
                 metavar="KEY=VALUE"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
RuntimeOpt = Annotated[
    str | None,
    typer.Option(help="Runtime that runs the compiled artifact (`hat plugins` lists them; default onnxruntime, "
                      "the one proven equal to int_infer).", show_default=False),
]


def check_runtime_stage(runtime: str | None, stages: list[str]) -> None:
    """UsageError when --runtime is given but no stage in `stages` is the deployed artifact."""
    from hatcli.errors import UsageError

    if runtime is not None and "deploy" not in stages:
        raise UsageError(f"--runtime {runtime}: only the deploy stage runs on a runtime; add --stage deploy "
                         "(or deploy to --compare)")


def load(recipe: Path, overrides: list[str] | None) -> Any:
    """Load a recipe with its overrides (plugins are loaded on first use)."""
    from hatcli.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


def print_json(data: Any) -> None:
    """Print `data` as one line of JSON on stdout (nothing else goes to stdout with --json)."""
    typer.echo(json.dumps(data, default=str))


def aligned_lines(header: list[str] | tuple[str, ...], rows: list[list[str]] | list[tuple[str, ...]]) -> list[str]:
    """The header and rows as plain lines, each column as wide as its widest cell; nothing is cut
    (a table's form for pipes and log files)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def print_metrics(title: str, metrics: dict[str, float]) -> None:
    """Print metrics as `title: top1 93.20  top5 100.00`."""
    text = "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())
    stdout.print(f"[bold]{title}[/]: {text}")
