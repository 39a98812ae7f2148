"""Progress and the consoles that commands print through.

On a terminal, progress is a rich bar that redraws in place; its text columns wrap rather than
being cut at the terminal's width. Anywhere else - a pipe, `| tee`, a log file, CI, or
`TERM=dumb` - there are no bars: a task prints a plain line at most every `LINE_EVERY_S` seconds
while it runs and one when it ends, each with its count, rate, elapsed time and ETA, never cut.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape
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
from rich.table import Column
from rich.text import Text

T = TypeVar("T")

console = Console(stderr=True)
"""Messages and progress go to stderr so that stdout stays clean for `--json`."""

stdout = Console()
"""Tables and results for the user go to stdout."""

WRAP = Column(no_wrap=False, overflow="fold")
"""`table_column` of a bar's text columns: on a narrow terminal they wrap instead of being cut with `…`."""

LINE_EVERY_S = 10.0
"""Off a terminal, the least time between two lines of one running task."""


def is_interactive() -> bool:
    """Whether progress can be drawn as bars: stderr is a terminal that redraws (or a notebook)."""
    return (console.is_terminal and not console.is_dumb_terminal) or console.is_jupyter


def print_line(text: str) -> None:
    """Print one plain line on stderr, as long as it is (no wrapping at the console width, no markup)."""
    console.print(escape(text), soft_wrap=True, highlight=False)


def duration(seconds: float | None) -> str:
    """Seconds as ``H:MM:SS`` (``-:--:--`` when unknown)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class RateColumn(ProgressColumn):
    """Items per second over rich's recent samples (blank until there is a rate)."""

    def render(self, task: Task) -> Text:
        """The rate of `task`, e.g. ``8,123/s``."""
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s", style="progress.data.speed")


@dataclass
class _LineTask:
    description: str
    total: float | None
    completed: float
    visible: bool
    transient: bool
    start_completed: float = 0.0
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)
    done: bool = False

    def line(self, final: bool) -> str:
        elapsed = time.monotonic() - self.started
        rate = (self.completed - self.start_completed) / elapsed if elapsed > 0 else None
        count = f"{self.completed:,.0f}" + (f"/{self.total:,.0f}" if self.total is not None else "")
        parts = [self.description, count]
        if self.total and not final:
            parts.append(f"({100 * self.completed / self.total:.0f}%)")
        if rate:
            parts.append(f"{rate:,.0f}/s")
        parts.append(f"elapsed {duration(elapsed)}")
        if not final and self.total is not None:
            parts.append(f"ETA {duration((self.total - self.completed) / rate if rate else None)}")
        return "  ".join(parts)


class LineProgress:
    """The part of rich's `Progress` that hat uses, for output that is not a terminal: no bars,
    a line per task at most every `every` seconds while it runs, and one when it ends (none for a
    `transient` progress, whose end is reported by its caller, e.g. validation inside an epoch)."""

    def __init__(self, transient: bool = False, every: float = LINE_EVERY_S) -> None:
        self.transient = transient
        self.every = every
        self.tasks: list[_LineTask] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Nothing to draw until there is something to say."""

    def stop(self) -> None:
        """Print the end line of every task that has not printed it yet."""
        for task in self.tasks:
            self._finish(task)

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: float = 0,
                 visible: bool = True, **fields: Any) -> int:
        """Start a task; returns its id."""
        self.tasks.append(_LineTask(str(description), total, completed, visible, self.transient,
                                    start_completed=completed))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        """Count `advance` more items done."""
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, visible: bool | None = None,
               refresh: bool = False, **fields: Any) -> None:
        """Change a task; prints a line when `every` seconds passed since its last one."""
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = str(description)
        if visible is not None:
            task.visible = visible
        now = time.monotonic()
        if task.total is not None and task.completed >= task.total:
            self._finish(task)
        elif task.visible and not task.done and now - task.last_line >= self.every:
            task.last_line = now
            print_line(task.line(final=False))

    def _finish(self, task: _LineTask) -> None:
        if not task.done:
            task.done = True
            if task.visible and not task.transient:
                print_line(task.line(final=True))


def make_progress(*extra_columns: ProgressColumn, transient: bool = False) -> Progress | LineProgress:
    """A bar with count, rate, elapsed time and ETA on stderr - or plain lines when stderr is no
    terminal (see `LineProgress`). `transient` bars vanish when done (and print no end line).
    Give `extra_columns` ``table_column=WRAP`` so that they wrap rather than being cut."""
    if not is_interactive():
        return LineProgress(transient=transient)
    return Progress(
        TextColumn("[bold]{task.description}", table_column=WRAP),
        BarColumn(),
        MofNCompleteColumn(table_column=WRAP),
        RateColumn(table_column=WRAP),
        *extra_columns,
        TimeElapsedColumn(table_column=WRAP),
        TimeRemainingColumn(table_column=WRAP),
        console=console,
        transient=transient,
    )


def track(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    """Iterate over `items` while showing progress with `description`."""
    with make_progress() as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
