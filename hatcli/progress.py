"""Rich progress bars and the console that commands print through."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

T = TypeVar("T")

console = Console(stderr=True)
"""Messages and progress go to stderr so that stdout stays clean for `--json`."""

stdout = Console()
"""Tables and results for the user go to stdout."""


class RateColumn(ProgressColumn):
    """Items per second over rich's recent samples (blank until there is a rate)."""

    def render(self, task: Task) -> Text:
        """The rate of `task`, e.g. ``8,123/s``."""
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s", style="progress.data.speed")


def make_progress(*extra_columns: object) -> Progress:
    """Return a Progress with a bar, count, rate, elapsed time and ETA, drawn on stderr."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def track(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    """Iterate over `items` while showing a progress bar with `description`."""
    with make_progress() as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
